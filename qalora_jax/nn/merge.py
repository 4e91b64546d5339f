"""Folding a trained adapter into its base weight.

QA-LoRA (exact, stays INT-k): with sum pooling, pool(x) A B = sum_l (sum_{i in l} x_i) (A B)_l, which is what
adding (A B)_l to every weight of group l contributes. With w~ = f(codes) + offset[l]:

    offset'[l, j] = offset[l, j] + s * (A B)[l, j]

so the merged tensor keeps its codes, scales, format and storage size; only the offsets change (computed in
float32, stored in the offsets' dtype: exact up to that dtype's rounding).

LoRA / QLoRA: W' = dequantize(W) + s * A B in float32, optionally re-quantized with any registered
quantizer (lossy: the "QLoRA w/ GPTQ" baseline of the QA-LoRA paper).
"""

from __future__ import annotations

import jax.numpy as jnp

from qalora_jax.nn.adapters import Adapter, delta_weight
from qalora_jax.quant import QTensor, Quantizer, has_group_offset, quantize_stacked


def check_qalora_base(kernel, group_size: int, where: str = "layer") -> None:
  """Raises ValueError unless `kernel` is a QTensor with per-group offsets over groups of `group_size`."""
  if not isinstance(kernel, QTensor):
    raise ValueError(f"{where}: a qalora adapter needs a group-quantized base weight (a QTensor), "
                     f"got a float {type(kernel).__name__}; quantize it with e.g. quant.get('int', ...)")
  if not has_group_offset(kernel):
    raise ValueError(f"{where}: a qalora adapter needs a base whose groups carry an additive offset "
                     f"(e.g. asymmetric 'int' or 'gptq'); got format {kernel.format!r} "
                     f"{dict(kernel.meta.options)}")
  if kernel.group_size != group_size:
    raise ValueError(f"{where}: qalora pooling group {group_size} differs from the base quantizer's group "
                     f"size {kernel.group_size}; they must be equal")


def merge_into_offsets(qt: QTensor, adapter: Adapter) -> QTensor:
  """QA-LoRA merge: offset' = offset + s * A B (per group). Same codes, scales, format and nbytes."""
  if adapter.meta.kind != "qalora":
    raise ValueError(f"merge_into_offsets needs a qalora adapter, got {adapter.meta.kind!r}")
  check_qalora_base(qt, adapter.meta.group_size)
  offset = qt["offset"]
  merged = offset.astype(jnp.float32) + delta_weight(adapter)
  return QTensor({**qt.arrays, "offset": merged.astype(offset.dtype)}, qt.meta)


def merge_into_kernel(kernel, adapter: Adapter, requantize: Quantizer | None = None):
  """LoRA / QLoRA merge: W' = W + s * A B in float32 ([..., in, out]); re-quantized when `requantize` is
  given (layer by layer over any leading axes)."""
  if adapter.meta.kind != "lora":
    raise ValueError(f"merge_into_kernel needs a lora adapter, got {adapter.meta.kind!r}")
  base = kernel.dequantize(jnp.float32) if isinstance(kernel, QTensor) else jnp.asarray(kernel, jnp.float32)
  merged = base + delta_weight(adapter)
  return merged if requantize is None else quantize_stacked(requantize, merged)


def merge_adapter(kernel, adapter: Adapter, requantize: Quantizer | None = None):
  """Merges one adapter into its base kernel: into the offsets for qalora, into the weight for lora."""
  if adapter.meta.kind == "qalora":
    return merge_into_offsets(kernel, adapter)
  return merge_into_kernel(kernel, adapter, requantize)
