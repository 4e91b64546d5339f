"""`pow2-int`: a quantizer registered from outside the package (the README's "Adding a quantizer" example).

Group-wise INT-k whose scale is a power of two, stored as an int8 exponent, with a float offset per group:
per group of g inputs of an output column,

    e = ceil(log2((max - min) / (2^k - 1))),  offset = min (rounded to `offset_dtype`),
    q = clip(round((w - offset) / 2^e), 0, 2^k - 1),  w~ = 2^e q + offset.

2^e is the smallest power of two whose 2^k - 1 steps span the group, so the step is at most twice `int`'s
and a scale costs 8 bits instead of 16. Because w~ = f(codes, e) + offset[l], the class declares
`group_offset = True` and its tensors hold `offset` [ceil(in / g), out]: QA-LoRA pools over its groups and
merges exactly into the offsets, with no change to the library.

Error bound, per element, from the stored exponent e and offset b of its group (top = b + (2^k - 1) 2^e):
|w - w~| <= max(2^(e-1), b - w, w - top) + 8 eps_32 max(|w|, |b|, |top|) + tiny_32.

Use it with `config.imports` (see config.py here) or `qalora quantize-report --import <this file>`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import checks, quant

BITS = (2, 3, 4, 8)
OFFSET_DTYPES = ("float16", "float32")
MIN_EXPONENT = -126  # 2^-126: float32's smallest normal number (an all-equal group)


def _grouped(x, group_size: int, mode: str = "edge"):
  """[in, out] -> [ceil(in / g), g, out], padding a short last group."""
  pad = (-x.shape[0]) % group_size
  if pad:
    x = jnp.pad(x, [(0, pad), (0, 0)], mode=mode)
  return x.reshape(-1, group_size, x.shape[1])


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "offset_dtype"))
def _quantize(w, *, bits, group_size, offset_dtype):
  maxq = 2**bits - 1
  wg = _grouped(w, group_size)
  lo, hi = wg.min(axis=1), wg.max(axis=1)
  offset = lo.astype(offset_dtype)
  b = offset.astype(jnp.float32)
  span = jnp.maximum(hi - b, 0.0)  # the stored offset may round above or below min
  need = span / maxq
  e = jnp.ceil(jnp.log2(jnp.where(need > 0, need, 1.0)))
  e = jnp.where(jnp.exp2(e) * maxq < span, e + 1, e)  # log2 rounding: make sure the steps span the group
  e = jnp.clip(jnp.where(need > 0, e, MIN_EXPONENT), MIN_EXPONENT, 127)
  step = jnp.exp2(e)[:, None]
  q = jnp.clip(jnp.round((wg - b[:, None]) / step), 0, maxq)
  codes = q.astype(jnp.uint8).reshape(-1, w.shape[1])[:w.shape[0]]
  return codes, e.astype(jnp.int8), offset


@quant.register("pow2-int")
@dataclasses.dataclass(frozen=True)
class Pow2IntQuantizer(quant.Quantizer):
  """INT-k with power-of-two scales (int8 exponents) and float offsets per group.

  Options: bits in 2, 3, 4, 8; group_size along `in` (-1: per output channel); offset_dtype (float16 | float32).
  """

  bits: int = 4
  group_size: int = 32
  offset_dtype: str = "float16"

  group_offset = True  # w~ = 2^e q + offset[l]: QA-LoRA may pool over the groups and merge into `offset`
  contract_settings = (dict(bits=4, group_size=32), dict(bits=3, group_size=48, offset_dtype="float32"))

  def __post_init__(self):
    checks.check_choice("bits", self.bits, BITS)
    checks.check_choice("offset_dtype", self.offset_dtype, OFFSET_DTYPES)
    quant.groups.check_group_option(self.group_size)

  def _quantize(self, w):
    g = quant.groups.check_group_size(self.group_size, w.shape[0])
    codes, exponent, offset = _quantize(w, bits=self.bits, group_size=g, offset_dtype=jnp.dtype(self.offset_dtype))
    arrays = {"codes": quant.pack(codes, self.bits, np.uint32), "exponent": exponent, "offset": offset}
    return quant.QTensor(arrays, quant.QMeta("pow2-int", tuple(w.shape), self.bits, g))

  @staticmethod
  def dequantize(qt, dtype=jnp.float32):
    """w~ = 2^e q + offset per group."""
    n_in = qt.shape[0]
    q = _grouped(quant.unpack(qt["codes"], qt.bits, n_in).astype(jnp.float32), qt.group_size, mode="constant")
    w = q * jnp.exp2(qt["exponent"].astype(jnp.float32))[:, None] + qt["offset"].astype(jnp.float32)[:, None]
    return w.reshape(-1, w.shape[-1])[:n_in].astype(dtype)

  def error_bound(self, w, qt):
    w = jnp.asarray(w, jnp.float32)
    wg = _grouped(w, qt.group_size)
    step = jnp.exp2(qt["exponent"].astype(jnp.float32))[:, None]
    b = qt["offset"].astype(jnp.float32)[:, None]
    top = b + (2**qt.bits - 1) * step
    m = jnp.maximum(jnp.abs(wg).max(axis=1, keepdims=True), jnp.maximum(jnp.abs(b), jnp.abs(top)))
    eps32, tiny32 = float(jnp.finfo(jnp.float32).eps), float(jnp.finfo(jnp.float32).smallest_normal)
    bound = jnp.maximum(jnp.maximum(step / 2, b - wg), wg - top) + 8 * eps32 * m + tiny32
    return bound.reshape(-1, w.shape[1])[:w.shape[0]]
