"""`nf4` and `fp4`: the 4-bit float formats of QLoRA, bit-exact with bitsandbytes.

Blocks of B consecutive inputs (B = 64 by default) share one absmax; for a torch [out, in] weight these are
bitsandbytes' blocks of the flattened tensor, so B must divide `in`. Per block:

    x = clip(w * (1 / absmax), -1, 1),  q = argmin_i |x - code[i]| (ties to the lower code value),
    w~ = code[q] * absmax                                             (all in float32).

`code` is the 16-value NF4 table (normal quantiles; values from QLoRA / bitsandbytes) or FP4 (E2M1,
values [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 for patterns 0..7, bit 3 the sign).

Double quantization (QLoRA section 3) stores the absmax values in 8 bits: with c = mean(absmax),
absmax - c is cut into blocks of 256 (in bitsandbytes' order: the [out, in / B] absmax array, flattened)
and each block is quantized to the signed 8-bit dynamic map with its own float32 absmax2 (through the
65536-bucket lookup bitsandbytes' CPU kernel uses, see `lookup_quantize8`):

    absmax~ = dyn[q8] * absmax2[block] + c.

Arrays: `codes` (4-bit, packed along `in` into uint8 with packing.py's layout), and either `absmax`
float32 [in / B, out], or `absmax_codes` uint8 [in / B, out], `absmax_scale` float32 [ceil(n / 256)] and
`absmax_offset` float32 []. NF4 block 64 with double quantization: 4 + 8/64 + 32/(64 * 256) = 4.127 bits.

Quantization runs in numpy float32 (eagerly), so its rounding is the IEEE rounding bitsandbytes' CPU path
does; dequantization is a jittable JAX function, bit-exact with bitsandbytes when run eagerly. Under jit,
XLA fuses the double-quantized absmax's multiply and add into one FMA: up to 1 ulp apart.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.checks import check_choice
from qalora_jax.quant import packing
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.registry import Quantizer, register

# QLoRA's NF4 code (bitsandbytes' float32 values), index 0..15.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# FP4 (E2M1) without subnormal scaling: magnitudes for bit patterns 0..7, bit 3 the sign, normalised to 1.
_FP4_MAGNITUDES = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], np.float32)
FP4_CODE = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]) / np.float32(12)

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DQ_BLOCK = 256


def _linspace_fma(start: float, stop: float, n: int) -> np.ndarray:
  """float32 linspace as torch computes it on CPU: each point one fused multiply-add from the nearer end."""
  start, stop = np.float32(start), np.float32(stop)
  step = np.float64(np.float32((stop - start) / np.float32(n - 1)))
  i = np.arange(n, dtype=np.float64)
  low = (np.float64(start) + step * i).astype(np.float32)
  high = (np.float64(stop) - step * (n - 1 - i)).astype(np.float32)
  return np.where(np.arange(n) < n // 2, low, high)


def dynamic_map_signed8() -> np.ndarray:
  """The signed 8-bit dynamic quantization map of Dettmers (2016), as bitsandbytes builds it for
  double quantization (7 exponent bits): for e = 0..6 the midpoints of 2^e + 1 points evenly spaced in
  [0.1, 1], times +-10^(e - 6); plus 0 and 1. 256 float32 values, sorted."""
  values = [np.float32(0.0), np.float32(1.0)]
  for e in range(7):
    edges = _linspace_fma(0.1, 1.0, 2**e + 1)
    mids = (edges[:-1] + edges[1:]) / np.float32(2)
    magnitude = 10.0 ** (e - 6)
    values += list(mids * np.float32(magnitude)) + list(mids * np.float32(-magnitude))
  return np.sort(np.array(values, np.float32))


DYNAMIC_MAP = dynamic_map_signed8()


def cascade_sum_f32(x: np.ndarray) -> np.float32:
  """Sum of a float32 vector in the order PyTorch's CPU kernel adds it, so bitsandbytes' double-quant
  offset (torch.mean = sum / n) is matched bit for bit.

  The vector is read as 8-lane SIMD words (1-lane below 8 values); words are taken 4 at a time into 4 accumulators, and
  those are summed in a cascade of 4 levels, each level absorbing 2^p batches of the one below (p = max(4,
  ceil(log2(batches)) / 4)), which keeps float32 rounding error near O(log n). The tail that does not
  fill a word is added in order, then the 8 lanes. (Exact for up to 32768 values; beyond that torch
  splits the sum over threads.)
  """
  x = np.asarray(x, np.float32).reshape(-1)
  lanes, ilp, levels = (8 if x.size >= 8 else 1), 4, 4
  n_words = x.size // lanes
  total = np.float32(0)
  if n_words:
    words = x[:n_words * lanes].reshape(n_words, lanes)
    n_batches = n_words // ilp
    batches = words[:n_batches * ilp].reshape(n_batches, ilp, lanes)
    power = max(4, int(np.ceil(np.log2(n_batches))) // levels if n_batches > 1 else 0)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((levels, ilp, lanes), np.float32)
    i = 0
    while i + step <= n_batches:
      for b in batches[i:i + step]:
        acc[0] += b
      i += step
      for level in range(1, levels):
        acc[level] += acc[level - 1]
        acc[level - 1] = 0
        if i & (mask << (level * power)):
          break
    for b in batches[i:]:
      acc[0] += b
    for level in range(1, levels):
      acc[0] += acc[level]
    partial = acc[0]
    for w in words[n_batches * ilp:]:
      partial[0] += w
    for k in range(1, ilp):
      partial[0] += partial[k]
    lane_sums = partial[0]
  else:
    lane_sums = np.zeros(0, np.float32)
  for v in x[n_words * lanes:]:
    total = np.float32(total + v)
  for v in lane_sums:
    total = np.float32(total + v)
  return total


def nearest_code(x: np.ndarray, code: np.ndarray) -> np.ndarray:
  """Index into `code` of the value nearest to x (float32); a tie goes to the lower code value."""
  order = np.argsort(code, kind="stable")
  ordered = code[order]
  midpoints = (ordered[:-1] + ordered[1:]) / np.float32(2)
  return order[np.searchsorted(midpoints, x, side="left")].astype(np.uint8)


def lookup_quantize8(x: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows of x [n, block] -> (8-bit codes, absmax [n]) the way bitsandbytes' CPU kernel (0.50) does it:
  x / absmax is mapped to one of 65536 even buckets, k = trunc(((v + 1) / 2) * 65535 + 1/2), and each
  bucket to the code nearest its centre 2k / 65535 - 1. Near a midpoint this can differ from the nearest
  code by one step; matching it is what makes the double-quantized absmax bit-identical."""
  absmax = np.abs(x).max(axis=1)
  v = x / np.where(absmax == 0, np.float32(1), absmax)[:, None]
  k = np.trunc((v + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.int64)
  centres = np.arange(65536, dtype=np.float32) / np.float32(65535) * np.float32(2) - np.float32(1)
  return nearest_code(centres, code)[np.clip(k, 0, 65535)], absmax


def absmax_quantize(x: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows of x [n, block] -> (codes [n, block], absmax [n]): x * (1 / absmax) to the nearest code."""
  absmax = np.abs(x).max(axis=1)
  inv = np.float32(1) / np.maximum(absmax, np.float32(1e-38))
  scaled = np.clip(x * inv[:, None], np.float32(-1), np.float32(1))
  return nearest_code(scaled, code), absmax


def _dq_layout(n_blocks: int, n_out: int) -> np.ndarray:
  """For each absmax entry [in / B, out]: its index in bitsandbytes' order ([out, in / B] flattened)."""
  return np.arange(n_out)[None, :] * n_blocks + np.arange(n_blocks)[:, None]


@dataclasses.dataclass(frozen=True)
class _Float4Quantizer(Quantizer):
  """Shared by nf4 and fp4. Options: block_size (inputs per absmax, must divide `in`), double_quant."""

  block_size: int = 64
  double_quant: bool = False

  code: ClassVar[np.ndarray]  # the 16 code values, set by each format
  contract_settings = (dict(block_size=64), dict(block_size=32, double_quant=True))

  def __post_init__(self):
    check_choice("block_size", self.block_size, BLOCK_SIZES)
    check_choice("double_quant", self.double_quant, (False, True))

  def check_shape(self, shape):
    if shape[0] % self.block_size:
      raise ValueError(f"block_size={self.block_size} must divide the input dimension {shape[0]}; "
                       f"allowed: {', '.join(str(b) for b in BLOCK_SIZES if shape[0] % b == 0) or 'none'}")

  def _quantize(self, w):
    w = np.asarray(w, np.float32)
    n_in, n_out = w.shape
    nb = n_in // self.block_size
    # Blocks in torch order: [out, in] rows, B consecutive inputs each.
    codes, absmax = absmax_quantize(w.T.reshape(-1, self.block_size), self.code)
    codes = codes.reshape(n_out, n_in).T
    absmax = absmax.reshape(n_out, nb)  # bitsandbytes' order
    arrays = {"codes": packing.pack(codes, 4, np.uint8)}
    if self.double_quant:
      offset = cascade_sum_f32(absmax) / np.float32(absmax.size)
      flat = absmax.reshape(-1) - offset
      pad = (-flat.size) % DQ_BLOCK
      # Zero padding cannot raise the short last block's absmax2.
      flat_codes, scale2 = lookup_quantize8(np.pad(flat, (0, pad)).reshape(-1, DQ_BLOCK), DYNAMIC_MAP)
      arrays["absmax_codes"] = jnp.asarray(flat_codes.reshape(-1)[:flat.size].reshape(n_out, nb).T)
      arrays["absmax_scale"] = jnp.asarray(scale2)
      arrays["absmax_offset"] = jnp.asarray(offset)
    else:
      arrays["absmax"] = jnp.asarray(absmax.T)
    meta = QMeta(self.name, (n_in, n_out), 4, self.block_size, (("double_quant", self.double_quant),))
    return QTensor(arrays, meta)

  @classmethod
  def dequantize(cls, qt: QTensor, dtype=jnp.float32) -> jax.Array:
    """w~ = code[q] * absmax per block, absmax~ = dyn[q8] * absmax2[block] + c when double-quantized."""
    n_in, n_out = qt.shape
    nb = n_in // qt.group_size
    if "absmax" in qt.arrays:
      absmax = qt["absmax"]
    else:
      block = jnp.asarray(_dq_layout(nb, n_out) // DQ_BLOCK)
      absmax = jnp.asarray(DYNAMIC_MAP)[qt["absmax_codes"]] * qt["absmax_scale"][block] + qt["absmax_offset"]
    q = packing.unpack(qt["codes"], 4, n_in)
    values = jnp.asarray(cls.code)[q].reshape(nb, qt.group_size, n_out)
    return (values * absmax[:, None, :]).reshape(n_in, n_out).astype(dtype)

  def error_bound(self, w, qt):
    """|w - w~| <= h absmax + 4 eps_32 absmax, h = half the widest gap of the code; with double
    quantization plus the absmax error (times max |code| = 1), at most h_8 * 2 max(absmax), h_8 = half
    the widest gap of the dynamic map (|absmax - c| <= max(absmax) bounds every absmax2)."""
    half_gap = float(np.diff(np.sort(self.code)).max()) / 2
    wb = jnp.abs(jnp.asarray(w, jnp.float32)).reshape(-1, self.block_size, w.shape[1]).max(axis=1, keepdims=True)
    bound = half_gap * wb + 4 * float(jnp.finfo(jnp.float32).eps) * wb
    if self.double_quant:
      half_gap8 = float(np.diff(DYNAMIC_MAP).max()) / 2
      bound = bound + half_gap8 * 2 * wb.max() * (1 + 4 * float(jnp.finfo(jnp.float32).eps))
    return jnp.broadcast_to(bound, wb.shape[:1] + (self.block_size, w.shape[1])).reshape(w.shape)


@register("nf4")
@dataclasses.dataclass(frozen=True)
class NF4Quantizer(_Float4Quantizer):
  """NormalFloat4 (QLoRA), bitsandbytes-exact."""

  code = NF4_CODE


@register("fp4")
@dataclasses.dataclass(frozen=True)
class FP4Quantizer(_Float4Quantizer):
  """FP4 E2M1 (bitsandbytes' fp4), bitsandbytes-exact."""

  code = FP4_CODE
