"""How much a quantizer costs on a model's linear weights: storage and reconstruction error.

For each layer, the relative squared reconstruction error is ||W - W~||_F^2 / ||W||_F^2; the report gives
its mean over layers, the total stored bytes, and bits per weight = 8 * bytes / number of weights.
With calibration data (`calibrated_report`) the model is quantized block by block (qalora_jax.calibration)
and each row adds the mean over layers of the output error ||X W - X W~||^2 / ||X W||^2 on the inputs each
layer sees in the quantized model, and the held-out perplexity of the quantized model.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qalora_jax import calibration as calibration_lib
from qalora_jax import models, quant, tree_paths
from qalora_jax.models import gguf, llama


@jax.jit
def relative_error(w: jax.Array, w_hat: jax.Array) -> jax.Array:
  """||w - w_hat||^2 / ||w||^2."""
  return jnp.sum(jnp.square(w - w_hat)) / jnp.sum(jnp.square(w))


@dataclasses.dataclass(frozen=True)
class ReportRow:
  quantizer: str
  bits: int
  group_size: int
  bits_per_weight: float
  bytes: int
  weight_rel_error: float
  options: dict[str, Any]
  output_rel_error: float | None = None  # with calibration data only
  ppl: float | None = None  # held-out perplexity, with calibration data only
  seconds: float | None = None  # time to quantize the model, with calibration data only

  def to_json(self) -> dict[str, Any]:
    """The fields, those of calibration data only left out without it."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def settings(quantizers: Sequence[str], bits: Sequence[int] | None, group_sizes: Sequence[int] | None,
             **extra) -> list[tuple[str, dict[str, Any]]]:
  """The (name, options) product of the requested values, each option applied to the quantizers that
  have it (`group_sizes` to `group_size` or `block_size`); duplicates removed, order kept."""
  out = []
  for name in quantizers:
    fields = {f.name for f in dataclasses.fields(quant.registry.quantizer_class(name))}
    axes = {}
    if bits and "bits" in fields:
      axes["bits"] = list(bits)
    size_key = "group_size" if "group_size" in fields else "block_size" if "block_size" in fields else None
    if group_sizes and size_key:
      axes[size_key] = list(group_sizes)
    axes.update({k: [v] for k, v in extra.items() if v is not None and k in fields})
    for values in itertools.product(*axes.values()):
      item = (name, dict(zip(axes, values)))
      if item not in out:
        out.append(item)
  return out


def quantization_report(kernels: Iterable[tuple[str, np.ndarray]], setting_list, progress: bool = True
                        ) -> list[ReportRow]:
  """Quantizes every kernel ([in, out] float) under every setting; one row per setting."""
  kernels = list(kernels)
  n_weights = sum(k.size for _, k in kernels)
  rows = []
  for name, options in setting_list:
    quantizer = quant.get(name, **options)
    total_bytes, errors = 0, []
    for _, w in tqdm(kernels, desc=f"{name} {options}", disable=not progress, leave=False):
      qt = quantizer.quantize(w)
      total_bytes += qt.nbytes
      errors.append(relative_error(jnp.asarray(w), qt.dequantize(jnp.float32)))
    rows.append(ReportRow(name, qt.bits, qt.group_size if options.get("group_size") != -1 else -1,
                          8 * total_bytes / n_weights, total_bytes, float(np.mean(jax.device_get(errors))),
                          quantizer.options()))
  return rows


def calibrated_report(lm, setting_list, tokens, heldout_ids, window: int = 512, progress: bool = True
                      ) -> list[ReportRow]:
  """Quantizes the model block by block on calibration `tokens` [segments, seq_len] under every setting
  (GPTQ with its Hessians, other quantizers on the weights alone); one row per setting, with the mean output
  error over the linear layers and the perplexity on `heldout_ids` (`window`-token windows)."""
  floats = dict(tree_paths.flatten(llama.stack_blocks(lm.params)))
  rows = []
  for name, options in setting_list:
    quantizer = quant.get(name, **options)
    frozen, stats = calibration_lib.quantize_model(lm.config, lm.params, tokens, quantizer, progress=progress)
    total_bytes, n_weights, errors = 0, 0, []
    for path, qt in tree_paths.flatten(llama.stack_blocks(frozen)):
      if not re.fullmatch(models.BLOCK_LINEARS, path):
        continue
      w = floats[path]
      total_bytes += qt.nbytes
      n_weights += int(np.prod(w.shape))
      w_hat = qt.dequantize(jnp.float32)
      errors += [relative_error(jnp.asarray(w[i]), w_hat[i]) for i in range(w.shape[0])]
    ppl = models.perplexity(lm, heldout_ids, window=window, params=frozen)
    rows.append(ReportRow(name, quantizer.bits, options.get("group_size", quantizer.group_size),
                          8 * total_bytes / n_weights, total_bytes, float(np.mean(jax.device_get(errors))),
                          quantizer.options(), stats.output_rel_error, ppl, stats.seconds))
  return rows


def report(model, setting_list, *, calibration: int | None = None, calibration_len: int = 512, seed: int = 0,
           eval_tokens: int = 8192, progress: bool = True) -> tuple[str, list[ReportRow]]:
  """(header line, rows) on `model`, a GGUF path: its block linears quantized alone (`quantization_report`), or
  with `calibration` segments of `calibration_len` tokens of the training plays (offsets from `seed`) block by
  block, perplexity on The Tempest's first `eval_tokens` tokens (`calibrated_report`; any path models.load reads)."""
  if calibration:
    lm = models.load(model)
    tokens = calibration_lib.calibration_tokens(lm, calibration, calibration_len, seed)
    held = calibration_lib.heldout_tokens(lm, eval_tokens)
    rows = calibrated_report(lm, setting_list, tokens, held, progress=progress)
    n = sum(int(v.size) for p, v in tree_paths.flatten(lm.params) if p.endswith("_proj/kernel"))
    return (f"{7 * lm.config.num_layers} linear layers, {n:,} weights; calibration {calibration} x "
            f"{calibration_len} tokens of the training plays; ppl on the first {len(held)} tokens of "
            f"The Tempest (512-token windows)"), rows
  kernels = list(gguf.linear_kernels(model))
  if not kernels:
    raise ValueError(f"--model {model}: no LLaMA block linear weights found")
  n = sum(k.size for _, k in kernels)
  header = f"{len(kernels)} linear layers, {n:,} weights ({4 * n:,} bytes as float32)"
  return header, quantization_report(kernels, setting_list, progress=progress)


def format_table(rows: Sequence[ReportRow]) -> str:
  """A Markdown table of the rows (with output error and perplexity columns when calibrated)."""
  calibrated = any(r.output_rel_error is not None for r in rows)
  extra = " output rel. error | ppl |" if calibrated else ""
  lines = ["| quantizer | bits | group | bits/weight | bytes | weight rel. error |" + extra,
           "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if calibrated else "")]
  for r in rows:
    line = (f"| {r.quantizer} | {r.bits} | {r.group_size} | {r.bits_per_weight:.3f} | {r.bytes:,} | "
            f"{r.weight_rel_error:.3e} |")
    if calibrated:
      line += (f" {r.output_rel_error:.3e} | {r.ppl:.2f} |" if r.output_rel_error is not None else " | |")
    lines.append(line)
  return "\n".join(lines)
