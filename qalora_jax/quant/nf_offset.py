"""`nf-offset`: NormalFloat codebooks (NF4, NF3, NF2) with a scale AND an offset per group, so QA-LoRA can
merge exactly into a non-uniform grid.

Each output column is cut along `in` into groups of g inputs (the last one shorter when g does not divide
`in`). Per group, with the codebook c_0 < ... < c_{2^k - 1} spanning [-1, 1]:

    offset = (max + min) / 2,  scale = (max - min) / 2   (both rounded to `scale_dtype`),
    x = (w - offset) / scale,   q = argmin_i |x - c_i| (ties to the lower value),
    w~ = scale * c[q] + offset.

So c = -1 and c = 1 land on the group's min and max, and c = 0 on its midpoint. Unlike absmax NF4
(`nf4`, w~ = absmax * c[q], kept bitsandbytes-exact), the additive offset is what QA-LoRA's merge needs:
offset'[l, j] = offset[l, j] + s (A B)[l, j] shifts every weight of group l by the same amount, whatever
the codes (quant.has_group_offset).

Codebooks: NF-k is built from standard normal quantiles as QLoRA builds NF4. With n = 2^k and
delta_k = 1 - (1 / (2 (n - 1)) + 1 / (2 n)) / 2 rounded to 7 decimals (QLoRA's 0.9677083 for k = 4),

    positive: Phi^-1(p) for p in linspace(delta_k, 1/2, n/2 + 1) without its last point   (n/2 values),
    negative: -Phi^-1(p) for p in linspace(delta_k, 1/2, n/2) without its last point     (n/2 - 1 values),
    plus 0; sorted and divided by the largest (so the ends are exactly -1 and 1).

The linspace is float32 as torch computes it and Phi^-1 runs in float64 on those points; the values are then
rounded to float32 and divided in float32. For k = 4 this reproduces bitsandbytes' NF4 table bit for bit
(tests/test_nf_offset.py). Every NF-k holds 0 exactly, has one more positive than negative value, and
NF2 = [-1, 0, 0.4358, 1], NF3 = [-1, -0.535, -0.247, 0, 0.183, 0.382, 0.623, 1].

Arrays: `codes` (k-bit codes packed along `in` into uint32, packing.py), `scale` and `offset`
[ceil(in / g), out] in `scale_dtype`. NF4 g64 with float16 scale and offset: 4 + 32/64 = 4.5 bits a weight.

Error bound, per element, from its group's stored scale s and offset b: with h the half of the widest gap
between neighbouring code values, |w - w~| <= max(h s, (b - s) - w, w - (b + s)) + 8 eps_32 M +
tiny_32, M = max(|w|, |b| + s) over the group: half a gap of the scaled codebook inside [b - s, b + s], the
distance to that range for a weight that storage rounding left outside it, plus float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.checks import check_choice
from qalora_jax.quant import packing
from qalora_jax.quant.nf4 import _linspace_fma as linspace_float32
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.groups import check_group_option, check_group_size, group_rows
from qalora_jax.quant.registry import Quantizer, register

NF_BITS = (2, 3, 4)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@functools.cache
def nf_codebook(bits: int) -> np.ndarray:
  """The NF-k codebook: 2^k sorted float32 values in [-1, 1] from normal quantiles (module docstring)."""
  check_choice("bits", bits, NF_BITS)
  n = 2**bits
  delta = round(1 - (1 / (2 * (n - 1)) + 1 / (2 * n)) / 2, 7)
  inverse_cdf = NormalDist().inv_cdf
  positive = [inverse_cdf(float(p)) for p in linspace_float32(delta, 0.5, n // 2 + 1)[:-1]]
  negative = [-inverse_cdf(float(p)) for p in linspace_float32(delta, 0.5, n // 2)[:-1]]
  values = np.sort(np.array(positive + [0.0] + negative)).astype(np.float32)
  return values / values.max()


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def quantize_nf_offset(w, *, bits, group_size, scale_dtype):
  """Returns (codes [in, out] uint8, scale [groups, out], offset [groups, out])."""
  code = jnp.asarray(nf_codebook(bits))
  wg = group_rows(w, group_size)
  lo, hi = wg.min(axis=1), wg.max(axis=1)
  scale = ((hi - lo) / 2).astype(scale_dtype)
  offset = ((hi + lo) / 2).astype(scale_dtype)
  s, b = scale.astype(jnp.float32)[:, None], offset.astype(jnp.float32)[:, None]
  x = (wg - b) / jnp.where(s == 0, 1.0, s)
  midpoints = (code[:-1] + code[1:]) / 2
  q = jnp.searchsorted(midpoints, x, side="left")  # x on a midpoint goes to the lower value
  codes = q.astype(jnp.uint8).reshape(-1, w.shape[1])[:w.shape[0]]
  return codes, scale, offset


def dequantize_nf_offset(qt: QTensor, dtype=jnp.float32) -> jax.Array:
  """w~ = scale * c[q] + offset per group."""
  n_in = qt.shape[0]
  q = packing.unpack(qt["codes"], qt.bits, n_in)
  values = group_rows(jnp.asarray(nf_codebook(qt.bits))[q], qt.group_size, mode="constant")
  w = values * qt["scale"].astype(jnp.float32)[:, None] + qt["offset"].astype(jnp.float32)[:, None]
  return w.reshape(-1, w.shape[-1])[:n_in].astype(dtype)


@register("nf-offset")
@dataclasses.dataclass(frozen=True)
class NFOffsetQuantizer(Quantizer):
  """Group-wise NormalFloat (NF4 / NF3 / NF2) with a per-group scale and offset: w~ = scale * c[q] + offset.

  Options: bits in 2, 3, 4; group_size along `in` (-1: one group per output channel); scale_dtype for
  scales and offsets (float16 | bfloat16 | float32; float32 keeps a QA-LoRA merge exact to float32).
  """

  bits: int = 4
  group_size: int = 64
  scale_dtype: str = "float16"

  group_offset = True  # w~ = scale * c[q] + offset[l]
  contract_settings = (dict(bits=4, group_size=32), dict(bits=3, group_size=48, scale_dtype="float32"))

  def __post_init__(self):
    check_choice("bits", self.bits, NF_BITS)
    check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
    check_group_option(self.group_size)

  def _quantize(self, w):
    g = check_group_size(self.group_size, w.shape[0])
    codes, scale, offset = quantize_nf_offset(w, bits=self.bits, group_size=g, scale_dtype=jnp.dtype(self.scale_dtype))
    arrays = {"codes": packing.pack(codes, self.bits, np.uint32), "scale": scale, "offset": offset}
    return QTensor(arrays, QMeta("nf-offset", tuple(w.shape), self.bits, g))

  dequantize = staticmethod(dequantize_nf_offset)

  def error_bound(self, w, qt):
    half_gap = float(np.diff(nf_codebook(qt.bits)).max()) / 2
    w = jnp.asarray(w, jnp.float32)
    wg = group_rows(w, qt.group_size)
    s = qt["scale"].astype(jnp.float32)[:, None]
    b = qt["offset"].astype(jnp.float32)[:, None]
    m = jnp.maximum(jnp.abs(wg).max(axis=1, keepdims=True), jnp.abs(b) + s)
    eps32 = float(jnp.finfo(jnp.float32).eps)
    tiny32 = float(jnp.finfo(jnp.float32).smallest_normal)
    bound = jnp.maximum(jnp.maximum(half_gap * s, (b - s) - wg), wg - (b + s)) + 8 * eps32 * m + tiny32
    return bound.reshape(-1, w.shape[1])[:w.shape[0]]
