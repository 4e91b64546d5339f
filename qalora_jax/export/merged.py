"""A run's or a model's export for other tools: the source checked against the format before anything is loaded,
the merged model built, the writer of `peft`, `gguf` or `gptq` called. What `qalora export` runs.

    report = merged.to_gguf("model.gguf", workdir="runs/x")                  # a run, its adapters merged
    report = merged.to_gptq("model-gptq", model="merged-dir", zeros="round")  # a model, its weights as they are

A source is a training workdir (QA-LoRA merges exactly into its INT-k base; LoRA into float weights, which
`requantize` ("name:k=v,...") quantizes again) or a model (`models.load` names), whose quantized weights are kept,
or its block linears quantized with `requantize`.
"""

from __future__ import annotations

import json
from pathlib import Path

from qalora_jax import models, quant
from qalora_jax.export import gguf as gguf_export
from qalora_jax.export import gptq as gptq_export
from qalora_jax.export import peft
from qalora_jax.train import experiment
from qalora_jax.train.config import quantizer_from_spec


def _check_run(workdir, requantize: str | None) -> dict | None:
  """A run's config.json; a QA-LoRA run merges exactly, so a `requantize` for it is refused."""
  cfg = experiment.run_config(workdir) if workdir else None
  if cfg and cfg["adapter"]["method"] == "qalora" and requantize:
    raise ValueError(f"--requantize {requantize}: a QA-LoRA run merges exactly into its INT-k base, there is "
                     f"nothing to re-quantize; allowed: no --requantize")
  return cfg


def merged_model(workdir=None, model=None, requantize: str | None = None, log=print):
  """(lm, info): the run's adapters folded into its base (experiment.merged_model), or the model with its
  quantized weights kept (its block linears quantized with `requantize` when given), info models.saved_info."""
  if workdir:
    return experiment.merged_model(workdir, requantize, log=log)
  rules = [(models.BLOCK_LINEARS, quantizer_from_spec(requantize))] if requantize else None
  lm = models.load(model, keep_quantized=rules is None, quantize=rules)
  return lm, models.saved_info(model) or {}


def source_gguf(name):
  """The GGUF file a model name resolves to (its metadata and tokenizer carry over), else None."""
  if not name or name == "tiny":
    return None
  path = models.lm.resolve(name)
  return path if path.suffix == ".gguf" else None


def to_peft(out, workdir, overwrite: bool = False, log=print) -> dict:
  """The run's adapters as a PEFT directory (export.peft)."""
  if not workdir:
    raise ValueError("--format peft exports a run's adapters; allowed: --workdir W")
  exp, trainable, _ = experiment.restore(workdir, log=log)
  if exp.cfg.adapter.extra_trainable:
    raise ValueError("--format peft: the run also trains non-adapter leaves "
                     f"({exp.cfg.adapter.extra_trainable}); PEFT adapter files hold adapters only")
  out = peft.export_peft(exp.adapters(trainable), out, base_model=exp.cfg.model.name, overwrite=overwrite)
  return {"out": str(out), "format": "peft"}


def to_gguf(out, workdir=None, model=None, *, requantize: str | None = None, merged: str = "exact",
            float_type: str = "source", allow_rounding: bool = False, overwrite: bool = False, log=print) -> dict:
  """The merged model as one GGUF file (export.gguf). merged="float" lets a LoRA run on a quantized base merge
  into float32 weights; "exact" refuses it unless `requantize` is given."""
  gguf_export.check_out(out, overwrite)
  cfg = _check_run(workdir, requantize)
  if cfg and cfg["adapter"]["method"] == "lora" and cfg["base"]["quantizer"] != "none" and not requantize \
      and merged != "float":
    raise ValueError(f"--workdir {workdir}: lora adapters on a {cfg['base']['quantizer']} base do not merge "
                     f"exactly into INT-k weights; allowed: --merged float (float32 weights) or --requantize "
                     f"NAME:k=v (lossy, e.g. int:bits=4,group_size=32)")
  lm, info = merged_model(workdir, model, requantize, log)
  report = gguf_export.export_gguf(out, lm.config, lm.params, lm.tokenizer,
                                   source=source_gguf(info.get("source", model)), float_type=float_type,
                                   allow_rounding=allow_rounding, overwrite=overwrite)
  return {**report, "format": "gguf"}


def to_gptq(out, workdir=None, model=None, *, requantize: str | None = None, merged: str = "exact",
            zeros: str = "int", overwrite: bool = False, log=print) -> dict:
  """The merged INT-k model as a GPTQ-layout directory (export.gptq). A LoRA run (float merged weights) is
  refused unless re-quantized, as is a quantizer whose tensors are not asymmetric INT-k with float16 scales.
  With zeros="round" the report gives what rounding the zeros costs (export.gptq.rounding_change, rounding_cost)."""
  if zeros not in gptq_export.ZERO_MODES:
    raise ValueError(f"--zeros {zeros!r} is not supported; allowed: {', '.join(gptq_export.ZERO_MODES)}")
  if merged != "exact":
    raise ValueError(f"--merged {merged} gives float weights, which the GPTQ layout cannot hold; allowed: "
                     f"--merged exact (or --requantize NAME:k=v)")
  gguf_export.check_out(out, overwrite)
  cfg = _check_run(workdir, requantize)
  if cfg and cfg["adapter"]["method"] == "qalora":
    quant.import_modules(cfg.get("imports", []), where="config.imports")
    base = quant.get(cfg["base"]["quantizer"], **cfg["base"]["options"])
    gptq_export.check_quantizer(base, f"--workdir {workdir}: config.base.quantizer={base.name!r}")
  elif cfg and not requantize:
    raise ValueError(f"--workdir {workdir}: config.adapter.method={cfg['adapter']['method']!r} with "
                     f"config.base.quantizer={cfg['base']['quantizer']!r} merges into float weights, which the GPTQ "
                     f"layout cannot hold; allowed: a QA-LoRA run on an INT-k base (int, int-mse, gptq) or "
                     f"--requantize NAME:k=v (lossy, e.g. gptq:bits=4,group_size=32)")
  if requantize:
    gptq_export.check_quantizer(quantizer_from_spec(requantize), f"--requantize {requantize}")
  lm, info = merged_model(workdir, model, requantize, log)
  out = gptq_export.export_gptq(lm.params, out, config=lm.config, zeros=zeros, overwrite=overwrite)
  quantize_config = json.loads((Path(out) / "quantize_config.json").read_text())
  cost = None
  if zeros == "round":
    ids = experiment.heldout_ids(lm, info.get("run_config"))
    cost = {"max_abs_dw": gptq_export.rounding_change(lm.params),
            **gptq_export.rounding_cost(lm, lm.params, ids, window=min(512, lm.config.max_seq_len, len(ids)))}
  return {"out": str(out), "format": "gptq", "zeros": zeros, "bits": quantize_config["bits"],
          "group_size": quantize_config["group_size"], "checkpoint_format": quantize_config["checkpoint_format"],
          "step": info.get("step"), "rounding_cost": cost}
