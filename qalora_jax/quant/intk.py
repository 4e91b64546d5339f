"""`int`: group-wise INT-k round-to-nearest, the base format of QA-LoRA.

Each output column is cut along `in` into groups of g inputs. Per group (QA-LoRA paper, Eq. 1):

    scale = (max - min) / (2^k - 1),  offset = min,  q = clip(round((w - offset) / scale), 0, 2^k - 1),
    w~ = scale * q + offset.

The offset is a float, not an integer zero point, so a QA-LoRA merge adds exactly to it. Scale and offset
are stored in `scale_dtype` (float16 by default: INT4 g128 costs 4 + 32/128 = 4.25 bits a weight) and the
codes are computed against the stored values, so the bound below holds for what is stored.
With `symmetric=True`: scale = max|w| / (2^(k-1) - 1), q = clip(round(w / scale), -2^(k-1), 2^(k-1) - 1)
stored as q + 2^(k-1), no offset array, w~ = scale * (q - 2^(k-1)).

Arrays: `codes` (k-bit codes packed along `in` into uint32, see packing.py), `scale` [ceil(in/g), out] and,
when asymmetric, `offset` [ceil(in/g), out]. A group size that does not divide `in` leaves a
shorter last group.

Error bound, per element: |w - w~| <= scale / 2 + 2 eps_s M + 8 eps_32 M + (2^k - 1) tiny_s, where M is the
group's max |w|, eps_s the storage dtype's machine epsilon and tiny_s the larger of its smallest subnormal
and float32's smallest normal (XLA flushes float32 subnormals): half a step, plus what rounding scale and
offset to their storage dtype can add at the clipped ends.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.checks import check_choice
from qalora_jax.quant import packing
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.groups import check_group_option, check_group_size, group_rows, ungroup_rows
from qalora_jax.quant.registry import Quantizer, register

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def affine_grid(lo, hi, maxq: int, scale_dtype):
  """(scale, offset) of the range [lo, hi] in the storage dtype: scale = (hi - lo) / (2^k - 1), offset = lo."""
  return ((hi - lo) / maxq).astype(scale_dtype), lo.astype(scale_dtype)


def affine_codes(wg, scale, offset, maxq: int):
  """(q, s, b) of grouped weights wg [groups, g, out] on the stored grid (scale, offset) [groups, out]:
  q = clip(round((w - b) / s), 0, 2^k - 1) with s, b the grid in float32 [groups, 1, out]."""
  s, b = scale.astype(jnp.float32)[:, None], offset.astype(jnp.float32)[:, None]
  return jnp.clip(jnp.round((wg - b) / jnp.where(s == 0, 1.0, s)), 0, maxq), s, b


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "scale_dtype"))
def quantize_affine(w, *, bits, group_size, symmetric, scale_dtype):
  """Returns (codes [in, out] uint8, scale [in/g, out], offset [in/g, out] or None)."""
  wg = group_rows(w, group_size)
  if symmetric:
    half = 2 ** (bits - 1)
    scale = (jnp.abs(wg).max(axis=1) / (half - 1)).astype(scale_dtype)
    s = scale.astype(jnp.float32)[:, None]
    q = jnp.clip(jnp.round(wg / jnp.where(s == 0, 1.0, s)), -half, half - 1) + half
    offset = None
  else:
    maxq = 2**bits - 1
    scale, offset = affine_grid(wg.min(axis=1), wg.max(axis=1), maxq, scale_dtype)
    q, _, _ = affine_codes(wg, scale, offset, maxq)
  return ungroup_rows(q.astype(jnp.uint8), w.shape[0]), scale, offset


def dequantize_affine(qt: QTensor, dtype=jnp.float32) -> jax.Array:
  """w~ = scale * q + offset per group (symmetric: scale * (q - 2^(k-1)))."""
  n_in, n_out = qt.shape
  q = packing.unpack(qt["codes"], qt.bits, n_in).astype(jnp.float32)
  qg = group_rows(q, qt.group_size, mode="constant")
  scale = qt["scale"].astype(jnp.float32)[:, None]
  if "offset" in qt.arrays:
    w = qg * scale + qt["offset"].astype(jnp.float32)[:, None]
  else:
    w = (qg - 2 ** (qt.bits - 1)) * scale
  return ungroup_rows(w, n_in).astype(dtype)


@register("int")
@dataclasses.dataclass(frozen=True)
class IntQuantizer(Quantizer):
  """Group-wise asymmetric (or symmetric) min-max INT-k, round to nearest.

  Options: bits in 2..8; group_size along `in` (-1: one group per output channel); symmetric;
  scale_dtype for scales and offsets (float16 | bfloat16 | float32).
  """

  bits: int = 4
  group_size: int = 128
  symmetric: bool = False
  scale_dtype: str = "float16"

  group_offset = True  # asymmetric: w~ = scale * q + offset; symmetric tensors carry no offset
  contract_settings = (
      dict(bits=4, group_size=32),
      dict(bits=3, group_size=64),
      dict(bits=2, group_size=-1),
      dict(bits=8, group_size=32, symmetric=True),
      dict(bits=4, group_size=32, scale_dtype="float32"),
  )

  def __post_init__(self):
    check_choice("bits", self.bits, INT_BITS)
    check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
    check_choice("symmetric", self.symmetric, (False, True))
    check_group_option(self.group_size)

  def _quantize(self, w):
    g = check_group_size(self.group_size, w.shape[0])
    codes, scale, offset = quantize_affine(
        w, bits=self.bits, group_size=g, symmetric=self.symmetric, scale_dtype=jnp.dtype(self.scale_dtype))
    arrays = {"codes": packing.pack(codes, self.bits, np.uint32), "scale": scale}
    if offset is not None:
      arrays["offset"] = offset
    meta = QMeta("int", tuple(w.shape), self.bits, g, (("symmetric", self.symmetric),))
    return QTensor(arrays, meta)

  dequantize = staticmethod(dequantize_affine)

  def error_bound(self, w, qt):
    return half_step_bound(w, qt, self.scale_dtype, eps_factor=2, tiny_factor=2**self.bits - 1)


def half_step_bound(w, qt: QTensor, scale_dtype: str, eps_factor: float, tiny_factor: float) -> jax.Array:
  """|w - w~| <= scale / 2 + eps_factor (eps_s + 4 eps_32) M + tiny_factor tiny_s per element, for a round to the
  nearest point of an affine grid: M the group's max |w|, eps_s the scale dtype's epsilon, and tiny_s the larger
  of its smallest subnormal and float32's smallest normal (XLA on CPU flushes float32 subnormals to zero, so a
  scale below float32's smallest normal may be stored as 0)."""
  sdt = jnp.dtype(scale_dtype)
  wg = group_rows(jnp.asarray(w, jnp.float32), qt.group_size)
  m = jnp.abs(wg).max(axis=1, keepdims=True)
  tiny_s = max(float(jnp.finfo(sdt).smallest_subnormal), float(jnp.finfo(jnp.float32).smallest_normal))
  eps = float(jnp.finfo(sdt).eps) + 4 * float(jnp.finfo(jnp.float32).eps)
  bound = qt["scale"].astype(jnp.float32)[:, None] / 2 + eps_factor * eps * m + tiny_factor * tiny_s
  return ungroup_rows(jnp.broadcast_to(bound, wg.shape), w.shape[0])
