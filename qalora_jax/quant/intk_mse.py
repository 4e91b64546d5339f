"""`int-mse`: group-wise INT-k whose clipping range is searched per group to minimise the squared error.

Same tensors as `int` (format "int", asymmetric): per group of g inputs of an output column,

    scale = (hi' - lo') / (2^k - 1),  offset = lo',  q = clip(round((w - offset) / scale), 0, 2^k - 1),
    w~ = scale * q + offset,

so every adapter, QA-LoRA's exact merge into the offsets and the GPTQ-layout export read them unchanged.
Only the range differs: `int` uses [lo', hi'] = [min, max]; here, with m = (min + max) / 2 the group's
midpoint and h = (max - min) / 2 its half-range, each end is pulled toward m by a factor on the grid

    f_i = 1 - (1 - min_shrink) * i / (grid - 1),  i = 0 .. grid - 1   (f_0 = 1: the min-max range itself),
    lo' = min + (1 - a) h,  hi' = max - (1 - c) h,

and the factors (a, c) are chosen by coordinate search on the error E(a, c) = sum_i (w_i - w~_i)^2 of the
group, computed with scale and offset rounded to `scale_dtype` as they are stored:

    1. both ends together: a = c = argmin_f E(f, f);
    2. the lower end alone: a = argmin_f E(f, c);   3. the upper end alone: c = argmin_f E(a, f).

A candidate replaces the current one only when its error is strictly lower, so every group's error is at most
`int`'s (f = 1 is `int`'s range, stored the same way). Clipping trades a larger error on the few extreme
weights for a finer step on all the others (`qalora quantize-report` measures the error against `int`'s on a
real model). The search costs 3 * grid evaluations of the group's error; the loop holds a few copies of the weight,
never grid copies.

Error bound, per element, from the stored scale s and offset b of its group (top = b + (2^k - 1) s):
|w - w~| <= max(s / 2, b - w, w - top) + 8 eps_32 M + (2^k - 1) tiny_32, M = max(|w|, |b|, |top|) over the
group: half a step inside the stored range, the distance to the range's end for a clipped weight, plus
float32 rounding (and XLA flushing float32 subnormal scales to zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.checks import check_choice
from qalora_jax.quant import packing
from qalora_jax.quant.intk import INT_BITS, SCALE_DTYPES, affine_codes, affine_grid, dequantize_affine
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.groups import check_group_option, check_group_size, group_rows
from qalora_jax.quant.registry import Quantizer, register


def _group_error(wg, valid, scale, offset, maxq: int):
  """Squared error per group [groups, out] of the stored grid, over the real rows (`valid` [groups, g, 1])."""
  q, s, b = affine_codes(wg, scale, offset, maxq)
  return jnp.sum(jnp.where(valid, jnp.square(q * s + b - wg), 0.0), axis=1)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "grid", "min_shrink", "scale_dtype"))
def quantize_mse(w, *, bits, group_size, grid, min_shrink, scale_dtype):
  """Returns (codes [in, out] uint8, scale [groups, out], offset [groups, out]) of the searched ranges."""
  maxq = 2**bits - 1
  wg = group_rows(w, group_size)
  valid = (jnp.arange(wg.shape[0] * group_size) < w.shape[0]).reshape(-1, group_size, 1)
  lo, hi = wg.min(axis=1), wg.max(axis=1)
  half = (hi - lo) / 2
  ones = jnp.ones_like(lo)

  def evaluate(a, c):
    scale, offset = affine_grid(lo + (1 - a) * half, hi - (1 - c) * half, maxq, scale_dtype)
    return _group_error(wg, valid, scale, offset, maxq)

  def search(end, state):
    def body(i, state):
      err, a, c = state
      f = jnp.float32(1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1))
      new_a = ones * f if end in ("both", "lower") else a
      new_c = ones * f if end in ("both", "upper") else c
      new_err = evaluate(new_a, new_c)
      better = new_err < err
      return jnp.where(better, new_err, err), jnp.where(better, new_a, a), jnp.where(better, new_c, c)

    return jax.lax.fori_loop(1 if end == "both" else 0, grid, body, state)

  state = (evaluate(ones, ones), ones, ones)
  for end in ("both", "lower", "upper"):
    state = search(end, state)
  _, a, c = state
  scale, offset = affine_grid(lo + (1 - a) * half, hi - (1 - c) * half, maxq, scale_dtype)
  q, _, _ = affine_codes(wg, scale, offset, maxq)
  codes = q.astype(jnp.uint8).reshape(-1, w.shape[1])[:w.shape[0]]
  return codes, scale, offset


@register("int-mse")
@dataclasses.dataclass(frozen=True)
class IntMSEQuantizer(Quantizer):
  """Group-wise asymmetric INT-k with an MSE-searched clipping range per group, stored as `int`.

  Options: bits in 2..8; group_size along `in` (-1: one group per output channel); scale_dtype for scales
  and offsets (float16 | bfloat16 | float32); grid, the number of shrink factors per search (2..256);
  min_shrink, the smallest factor (0 < min_shrink < 1).
  """

  bits: int = 4
  group_size: int = 128
  scale_dtype: str = "float16"
  grid: int = 20
  min_shrink: float = 0.5

  group_offset = True  # format "int", asymmetric: w~ = scale * q + offset
  contract_settings = (dict(bits=3, group_size=32), dict(bits=2, group_size=-1, scale_dtype="float32", grid=8))

  def __post_init__(self):
    check_choice("bits", self.bits, INT_BITS)
    check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
    check_group_option(self.group_size)
    if not (isinstance(self.grid, (int, np.integer)) and not isinstance(self.grid, bool) and 2 <= self.grid <= 256):
      raise ValueError(f"grid={self.grid!r} is not supported; allowed: an integer in 2..256")
    if not (isinstance(self.min_shrink, (int, float)) and not isinstance(self.min_shrink, bool)
            and 0.0 < self.min_shrink < 1.0):
      raise ValueError(f"min_shrink={self.min_shrink!r} is not supported; allowed: a number in (0, 1)")

  def _quantize(self, w):
    g = check_group_size(self.group_size, w.shape[0])
    codes, scale, offset = quantize_mse(w, bits=self.bits, group_size=g, grid=int(self.grid),
                                        min_shrink=float(self.min_shrink), scale_dtype=jnp.dtype(self.scale_dtype))
    arrays = {"codes": packing.pack(codes, self.bits, np.uint32), "scale": scale, "offset": offset}
    return QTensor(arrays, QMeta("int", tuple(w.shape), self.bits, g, (("symmetric", False),)))

  dequantize = staticmethod(dequantize_affine)

  def error_bound(self, w, qt):
    maxq = 2**qt.bits - 1
    w = jnp.asarray(w, jnp.float32)
    wg = group_rows(w, qt.group_size)
    s = qt["scale"].astype(jnp.float32)[:, None]
    b = qt["offset"].astype(jnp.float32)[:, None]
    top = b + maxq * s
    m = jnp.maximum(jnp.abs(wg).max(axis=1, keepdims=True), jnp.maximum(jnp.abs(b), jnp.abs(top)))
    eps32 = float(jnp.finfo(jnp.float32).eps)
    tiny32 = float(jnp.finfo(jnp.float32).smallest_normal)
    bound = jnp.maximum(jnp.maximum(s / 2, b - wg), wg - top) + 8 * eps32 * m + maxq * tiny32
    return bound.reshape(-1, w.shape[1])[:w.shape[0]]
