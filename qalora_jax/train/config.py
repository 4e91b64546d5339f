"""Experiment configs: ml_collections ConfigDicts, the schema they follow, loading and overrides.

A config file in configs/ defines `get_config(arg)` (arg: a "k=v,k=v" variant string, big_vision style)
and starts from `base_config()`. `load(spec, overrides)` reads "configs/x.py[:arg]", applies command-line
overrides such as `--config.adapter.rank=8`, and validates every field against the schema before anything
runs: unknown keys name the nearest valid one, wrong types and values name the allowed ones.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

from qalora_jax import tree_paths
from qalora_jax.models.config import DTYPES, REMAT_KEEPS
from qalora_jax.nn.adapters import METHODS
from qalora_jax.nn.trees import ALL_LINEARS

CHOICES = {
    "model.dtype": DTYPES,
    "model.matmul_dtype": DTYPES,
    "model.remat_keep": REMAT_KEEPS,
    "adapter.method": METHODS,
    "optim.schedule": ("constant", "cosine"),
}


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with its default (QA-LoRA, INT4 g32 base, r = 16 on SmolLM2 + Shakespeare)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 100
  c.log_every = 10
  c.eval_every = 0  # 0: evaluate at the start and the end only
  c.checkpoint_every = 50
  c.sample_prompt = ""  # when set, a greedy continuation is printed before and after training
  c.sample_tokens = 32
  # Also write metrics.jsonl's scalars (loss, learning rate, gradient norm, tokens/s, perplexities) as TensorBoard
  # events in WORKDIR/tensorboard/; False writes none (and creates no such directory).
  c.tensorboard = True
  # Modules to import before the quantizers are looked up: module names or .py paths (relative to the working
  # directory) that register quantizers defined outside qalora_jax.quant, e.g. ("my_quantizers/pow2.py",).
  c.imports = ()

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m"  # asset name, GGUF path, Hugging Face directory, or "tiny" (random, for tests)
  c.model.dtype = "float32"  # compute dtype of activations, norms, softmax and adapters
  # Operands of the base weight matmuls and the head in training ("bfloat16": mixed precision, several times
  # faster on CPUs with AMX and on accelerators); perplexities are always evaluated with float matmuls.
  c.model.matmul_dtype = "float32"
  c.model.remat = False
  # With remat: "qkv", "mlp" or "qkv,mlp" keeps those activations instead of recomputing them (models.Config).
  c.model.remat_keep = ""
  c.model.scan_layers = True

  c.base = ml_collections.ConfigDict()
  c.base.quantizer = "int"  # a registered quantizer, or "none" for a float base (LoRA)
  c.base.options = ml_collections.ConfigDict({"bits": 4, "group_size": 32})  # passed to quant.get
  c.base.targets = r"blocks/(attn|mlp)/[a-z_]+_proj/kernel"  # which weights are quantized
  # Quantizers that use calibration data (GPTQ): segments x tokens of the training plays, run through the
  # model block by block (qalora_jax.calibration). Quantized bases are cached under the asset cache.
  c.base.calibration = 128
  c.base.calibration_len = 512
  c.base.calibration_seed = 0  # which segments: fixed, so that the runs of a seed sweep share one base

  c.adapter = ml_collections.ConfigDict()
  c.adapter.method = "qalora"
  c.adapter.rank = 16
  c.adapter.alpha = 32.0
  c.adapter.dropout = 0.0
  c.adapter.rslora = False
  c.adapter.targets = ALL_LINEARS
  c.adapter.extra_trainable = ""  # regex over frozen leaf paths that train too, e.g. ".*norm/scale"

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "shakespeare"  # asset name or a directory of .md / .txt files
  c.data.jsonl = ""  # an Alpaca-style instruction file instead of the corpus
  c.data.heldout = ("romances/the-tempest",)
  c.data.seq_len = 128
  c.data.batch_size = 4
  c.data.eval_tokens = 8192  # held-out tokens used for perplexity (first N)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 2e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.max_grad_norm = 0.3
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9  # AdamW's moment decays and epsilon
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.accum_steps = 1

  # Devices: a (data, fsdp) mesh; data * fsdp must equal the number of devices, an axis set to 0 takes the
  # devices the other leaves (the default: data parallelism over every device). Batches are split over both
  # axes, parameters, adapters and optimizer state over fsdp (qalora_jax.train.mesh).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 0
  c.mesh.fsdp = 1

  # Extra evaluations at the end of a run: the merged model re-quantized with each of these quantizers
  # ("name:k=v,k=v", e.g. "gptq:bits=4,group_size=32"); result.json gets requantized_ppl[spec]. On the command
  # line: --config.requantize="gptq:bits=4,group_size=32;gptq:bits=3,group_size=32".
  c.requantize = ()
  return c


def parse_arg(arg: str | None) -> dict[str, Any]:
  """"k=v,k2=v2,flag" -> {"k": v, ..., "flag": True} with Python literals where they parse ("3" -> 3), strings
  otherwise."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = _literal(value.strip()) if "=" in item else True
  return out


def runlocal(config: ml_collections.ConfigDict, steps: int = 12) -> None:
  """Shrinks a config in place for a smoke test, as big_vision's `runlocal`: `CONFIG.py:runlocal` on the command
  line. The tests' random 2-block model (models.tiny_model), `steps` steps of 4 x 32 tokens, 512 held-out
  tokens, r = 4 and alpha 8 at a learning rate of 1e-2 without warm-up, logs and checkpoints every 4 steps, and
  quantizer groups that fit the model's 64-wide layers (group_size at most 16, an NF4 / FP4 block_size at most
  32)."""
  config.model.name = "tiny"
  config.data.seq_len, config.data.batch_size, config.data.eval_tokens = 32, 4, 512
  config.adapter.rank, config.adapter.alpha = 4, 8.0
  config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 0
  config.steps, config.log_every, config.checkpoint_every = steps, 4, 4
  options = config.base.options
  if "group_size" in options:
    options.group_size = min(options.group_size, 16)
  if config.base.quantizer in ("nf4", "fp4") and "block_size" in options:
    options.block_size = min(options.block_size, 32)


def _literal(text: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def call_file(spec: str, function: str, what: str) -> Any:
  """`function(arg)` of the Python file of a "path/to/file.py[:arg]" spec (a config or a sweep file)."""
  path, _, arg = spec.partition(":")
  if not Path(path).is_file():
    raise ValueError(f"--config {path}: no such {what} file")
  module_spec = importlib.util.spec_from_file_location(f"qalora_{what}_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, function):
    raise ValueError(f"--config {path}: defines no {function}(arg)")
  return getattr(module, function)(arg or None)


def to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as JSON: what a workdir's config.json and a result.json hold."""
  return json.loads(config.to_json_best_effort())


def flat(config_json: dict) -> dict:
  """A config as JSON with dotted keys: {"adapter": {"rank": 16}} -> {"adapter.rank": 16}."""
  return dict(tree_paths.flatten(config_json, sep="."))


def changed_fields(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """The dotted fields in which `config` differs from a saved config.json, leaving out what does not change the
  computation (the mesh: the same run on other devices; the TensorBoard switch); a field added to the schema
  after `saved` was written counts as its default there."""
  old, new = flat(saved), flat(to_json(config))
  defaults = {k: v for k, v in flat(to_json(base_config())).items() if not k.startswith("base.options.")}
  return sorted(k for k in old.keys() | new.keys()
                if old.get(k, defaults.get(k)) != new.get(k) and not k.startswith("mesh.") and k != "tensorboard")


def load(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads "path/to/config.py[:arg]", applies "--config.a.b=v" overrides, validates, returns the config."""
  config = call_file(spec, "get_config", "config")
  args = parse_arg(spec.partition(":")[2])
  if args.get("runlocal"):
    runlocal(config, **({"steps": config.steps} if "steps" in args else {}))
  for item in overrides:
    apply_override(config, item)
  validate(config)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one "--config.a.b=value" (or "a.b=value") override, coercing to the field's type."""
  text = item[2:] if item.startswith("--") else item
  if not text.startswith("config.") or "=" not in text:
    raise ValueError(f"override {item!r} must look like --config.section.key=value")
  dotted, value = text[len("config."):].split("=", 1)
  keys = dotted.split(".")
  node = config
  for depth, key in enumerate(keys[:-1]):
    if key not in node or not isinstance(node[key], ml_collections.ConfigDict):
      _unknown(".".join(keys[: depth + 1]), node)
    node = node[key]
  key = keys[-1]
  free_form = dotted.startswith("base.options.")
  if key not in node and not free_form:
    _unknown(dotted, node)
  current = node[key] if key in node else None
  node[key] = _coerce(dotted, value, current)


def override(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets config.<dotted> to a Python value (as sweep files give them), checked as a command-line override
  is; "base.options" takes a whole dict (a quantizer's options replace the previous quantizer's)."""
  if dotted == "base.options":
    if not isinstance(value, dict):
      raise ValueError(f"config.base.options={value!r}: expected a dict of quantizer options")
    config.base.options = ml_collections.ConfigDict(dict(value))
    return
  text = repr(tuple(value)) if isinstance(value, (list, tuple)) else str(value)  # "True" reads as a bool too
  apply_override(config, f"config.{dotted}={text}")


def _unknown(dotted: str, node: ml_collections.ConfigDict) -> None:
  key = dotted.split(".")[-1]
  near = difflib.get_close_matches(key, list(node.keys()), n=1)
  hint = f" (did you mean {'.'.join(dotted.split('.')[:-1] + [near[0]])!r}?)" if near else ""
  raise ValueError(f"unknown config key {dotted!r}{hint}; valid keys here: {', '.join(sorted(node.keys()))}")


def _coerce(dotted: str, text: str, current: Any) -> Any:
  value = _literal(text)
  if current is None:
    return value
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ValueError(f"config.{dotted}={text!r}: expected true or false")
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple):
    if not isinstance(value, str):
      return tuple(value)
    return tuple(v.strip() for v in text.split(";" if ";" in text else ",") if v.strip())
  if isinstance(current, str):
    return text
  if type(value) is not type(current):
    raise ValueError(f"config.{dotted}={text!r}: expected {type(current).__name__}")
  return value


def from_json(obj: dict) -> ml_collections.ConfigDict:
  """The config of a run from its config.json (lists become the tuples the schema has); validated."""
  def convert(schema, values, prefix=""):
    for key, value in values.items():
      if key not in schema and not prefix.startswith("base.options"):
        _unknown(f"{prefix}{key}", schema)
      current = schema[key] if key in schema else None
      if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        if f"{prefix}{key}" == "base.options":
          schema[key] = ml_collections.ConfigDict(value)
        else:
          convert(current, value, f"{prefix}{key}.")
      else:
        schema[key] = tuple(value) if isinstance(current, tuple) else value

  config = base_config()
  convert(config, obj)
  validate(config)
  return config


def validate(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict | None = None, prefix: str = ""
             ) -> None:
  """Checks keys and types against `base_config()` and the value constraints; raises ValueError."""
  top = schema is None
  schema = base_config() if top else schema
  for key in config.keys():
    dotted = f"{prefix}{key}"
    if key not in schema:
      _unknown(dotted, schema)
    value, expected = config[key], schema[key]
    if dotted == "base.options":
      continue  # validated by the quantizer itself below
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f"config.{dotted} must be a section, got {value!r}")
      validate(value, expected, f"{dotted}.")
    elif isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool):
      continue
    elif type(value) is not type(expected):
      raise ValueError(f"config.{dotted}={value!r}: expected {type(expected).__name__}")
  if not top:
    return
  for dotted, allowed in CHOICES.items():
    section, key = dotted.split(".")
    if config[section][key] not in allowed:
      raise ValueError(f"config.{dotted}={config[section][key]!r} is not supported; allowed: "
                       f"{', '.join(a or repr(a) for a in allowed)}")
  if config.model.remat_keep and not config.model.remat:
    raise ValueError(f"config.model.remat_keep={config.model.remat_keep!r} needs config.model.remat=True; allowed "
                     f"without it: ''")
  if config.steps < 0:
    raise ValueError(f"config.steps={config.steps} must be at least 0 (0: evaluate the base only)")
  for dotted in ("data.seq_len", "data.batch_size", "adapter.rank", "optim.accum_steps", "base.calibration",
                 "base.calibration_len"):
    section, key = dotted.split(".")
    if config[section][key] < 1:
      raise ValueError(f"config.{dotted}={config[section][key]} must be at least 1")
  for axis in ("data", "fsdp"):
    if config.mesh[axis] < 0:
      raise ValueError(f"config.mesh.{axis}={config.mesh[axis]} must be at least 0 (0: the devices the other "
                       f"axis leaves)")
  if config.mesh.data == 0 and config.mesh.fsdp == 0:
    raise ValueError("config.mesh.data and config.mesh.fsdp are both 0; at most one may be 0 (it takes the devices "
                     "the other leaves)")
  if config.data.batch_size % config.optim.accum_steps:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must be a multiple of "
                     f"config.optim.accum_steps={config.optim.accum_steps}")
  for beta in ("b1", "b2"):
    if not 0.0 <= config.optim[beta] < 1.0:
      raise ValueError(f"config.optim.{beta}={config.optim[beta]} must be in [0, 1)")
  if not config.optim.eps > 0.0:
    raise ValueError(f"config.optim.eps={config.optim.eps} must be positive")
  if not 0.0 <= config.adapter.dropout < 1.0:
    raise ValueError(f"config.adapter.dropout={config.adapter.dropout} must be in [0, 1)")
  from qalora_jax import quant

  quant.import_modules(config.imports, where=f"config.imports={tuple(config.imports)!r}")
  if config.base.quantizer != "none":
    quantizer = quant.get(config.base.quantizer, **config.base.options.to_dict())
    if config.adapter.method == "qalora":
      check_qalora_quantizer(quantizer, "config.base")
  elif config.adapter.method == "qalora":
    raise ValueError("config.adapter.method='qalora' needs a group-quantized base; config.base.quantizer is 'none'")
  for spec in config.requantize:
    if config.adapter.method != "lora":
      raise ValueError(f"config.requantize={spec!r}: only a LoRA run has a float merged model to re-quantize; "
                       f"config.adapter.method is {config.adapter.method!r}")
    try:
      quantizer_from_spec(spec)
    except (ValueError, TypeError) as e:
      raise ValueError(f"config.requantize={spec!r}: {e}") from None


def quantizer_from_spec(spec: str):
  """The quantizer of a "name:k=v,k=v" spec, e.g. "gptq:bits=4,group_size=32"."""
  from qalora_jax import quant

  name, _, options = spec.partition(":")
  return quant.get(name, **parse_arg(options))


def check_qalora_quantizer(quantizer, where: str = "config.base") -> None:
  """Raises ValueError unless `quantizer` makes tensors QA-LoRA can pool and merge into: it quantizes a small
  random weight and checks quant.has_group_offset and the offset's shape [ceil(in / g), out]. A quantizer that
  refuses the probe's shape is left to the check made when the adapters are added."""
  import numpy as np

  from qalora_jax import quant

  size = next((v for v in (getattr(quantizer, "group_size", None), getattr(quantizer, "block_size", None))
               if isinstance(v, int) and v > 0), 32)
  w = np.random.default_rng(0).standard_normal((2 * size, 4)).astype(np.float32)
  try:
    quantizer.check_shape(w.shape)
  except ValueError:
    return
  qt = quantizer.quantize(w)
  offset = qt.arrays.get("offset")
  groups = quant.groups.num_groups(w.shape[0], qt.group_size)
  if not quant.has_group_offset(qt) or tuple(offset.shape) != (groups, w.shape[1]):
    fit = [name for name in quant.available() if quant.registry.quantizer_class(name).group_offset]
    raise ValueError(f"config.adapter.method='qalora' needs a base whose groups carry an additive offset "
                     f"(a quantizer with group_offset = True whose tensors hold 'offset' [groups, out]); "
                     f"{where}.quantizer={quantizer.name!r} with options {quantizer.options()} does not; "
                     f"allowed: {', '.join(fit)}, with options that keep the offset (int: symmetric=False)")
