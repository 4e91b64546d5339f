"""`gptq`: GPTQ (Frantar et al., 2022), group-wise asymmetric INT-k that minimises the layer's OUTPUT error.

Given a kernel W [in, out] and the Hessian of the layer's calibration inputs x (rows of X [N, in]),

    H = (2 / N) sum_n x_n x_n^T        [in, in],

GPTQ quantizes the inputs (the rows of W here; the "columns" of the papers' [out, in] weight) one at a time,
each time moving the rounding error onto the inputs not yet quantized so that ||X W - X W~||^2 stays small:

    dead inputs (H_ii = 0): H_ii = 1, W_i = 0;   H += damp * mean(diag H) * I;   H^-1 = U^T U (U upper)
    for i = 0 .. in-1 (in blocks of `block_size` rows, later rows updated lazily once per block):
      if i starts a group: scale, zero of the group from its rows of the already updated W
      w~_i = scale * (q_i - zero),  q_i = clip(round(W_i / scale) + zero, 0, 2^k - 1)
      e_i = (W_i - w~_i) / U_ii;     W_j -= U_ij e_i   for j > i

The grid is GPTQ's (AutoGPTQ's `Quantizer.find_params`): xmin = min(min(w), 0), xmax = max(max(w), 0)
over the group (an all-zero group uses [-1, 1]), scale = (xmax - xmin) / (2^k - 1), integer
zero = round(-xmin / scale). It is stored in the float-offset form of `int` (format "int", w~ = scale * q +
offset) with offset = -scale * zero, computed by `zero_to_offset` in float32 and rounded to `scale_dtype`
(the integer zero is recovered exactly as round(-offset / scale), which the GPTQ-layout export uses).
Every adapter, merge and export that reads `int` tensors reads these unchanged.

Groups are contiguous runs of `group_size` inputs (the last one shorter when it does not divide `in`), as
QA-LoRA needs. With act_order=True the inputs are visited by decreasing H_ii; the groups then stay
contiguous only with static_groups=True (their scale and zero are computed from the original W before the
loop, AutoGPTQ's `static_groups`), so act_order without static groups is refused.

Block boundaries are aligned to groups (the effective block is a multiple of `group_size`, or one group
when groups are larger than `block_size`), so every group's parameters see all updates made before it.
(AutoGPTQ reads a group that starts inside a block from its lazily updated copy, which lacks the updates
from earlier rows of the same block; with the usual g = block = 128 the two agree.)

Without calibration data (`quantize(w)`, used by the registry's contract tests) H = I: U is diagonal, no
error is moved, and GPTQ is round-to-nearest on its grid, for which `error_bound` holds. With a real H GPTQ
trades element-wise error for output error and no element-wise bound holds: measure it with
`output_relative_error`. The Hessians come from `qalora_jax.calibration`, which runs the model.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.checks import check_choice
from qalora_jax.quant import packing
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.intk import dequantize_affine, half_step_bound
from qalora_jax.quant.groups import check_group_option, check_group_size, num_groups
from qalora_jax.quant.registry import Quantizer, check_weight, register

GPTQ_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "float32")  # float16: GPTQ checkpoints' scales; bfloat16 cannot hold offset = -scale * zero
DAMP_RETRY_FACTOR = 10.0  # a Hessian that fails Cholesky is retried once with damp * DAMP_RETRY_FACTOR


def zero_to_offset(scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
  """offset = -scale * zero, in float32 then rounded to `dtype`: the one rule shared by the quantizer and the
  GPTQ-layout import, so a checkpoint round trip is bit-identical."""
  return (-(jnp.asarray(scale).astype(jnp.float32) * jnp.asarray(zero).astype(jnp.float32))).astype(dtype)


def offset_to_zero(scale: jax.Array, offset: jax.Array) -> jax.Array:
  """The (float) zero point of an offset: zero = -offset / scale (0 where scale = 0)."""
  s = jnp.asarray(scale).astype(jnp.float32)
  return jnp.where(s == 0, 0.0, -jnp.asarray(offset).astype(jnp.float32) / jnp.where(s == 0, 1.0, s))


def grid(xmin: jax.Array, xmax: jax.Array, bits: int, scale_dtype) -> tuple[jax.Array, jax.Array]:
  """GPTQ's asymmetric grid of groups with minimum `xmin` and maximum `xmax` (each [out]):
  scale = (max(xmax, 0) - min(xmin, 0)) / (2^k - 1), zero = round(-min(xmin, 0) / scale);
  returns (scale, offset = -scale * zero), both in `scale_dtype`."""
  maxq = 2**bits - 1
  lo, hi = jnp.minimum(xmin, 0.0), jnp.maximum(xmax, 0.0)
  empty = (lo == 0) & (hi == 0)
  lo, hi = jnp.where(empty, -1.0, lo), jnp.where(empty, 1.0, hi)
  scale = ((hi - lo) / maxq).astype(scale_dtype)
  s = scale.astype(jnp.float32)
  zero = jnp.clip(jnp.round(-lo / jnp.where(s == 0, 1.0, s)), 0, maxq)
  return scale, zero_to_offset(scale, zero, scale_dtype)


def _quantize_row(w, scale, offset, maxq):
  """Codes and dequantized values of one input row w [out] on a grid (scale, offset) [out]."""
  s, o = scale.astype(jnp.float32), offset.astype(jnp.float32)
  q = jnp.clip(jnp.round((w - o) / jnp.where(s == 0, 1.0, s)), 0, maxq)
  return q, s * q + o


@functools.partial(jax.jit, static_argnames=("damp",))
def inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1; NaN when that is not positive definite."""
  n = h.shape[0]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(n, dtype=h.dtype))
  h_inv = (h_inv + h_inv.T) / 2
  return jnp.linalg.cholesky(h_inv).T


def damped_inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """`inverse_cholesky` with damp, retried once with DAMP_RETRY_FACTOR times more; ValueError if both fail."""
  u = inverse_cholesky(h, float(damp))
  if bool(jnp.isfinite(u).all()):
    return u
  retry = float(damp) * DAMP_RETRY_FACTOR
  warnings.warn(f"GPTQ: Hessian not positive definite with damp={damp}; retrying once with damp={retry}")
  u = inverse_cholesky(h, retry)
  if not bool(jnp.isfinite(u).all()):
    raise ValueError(f"hessian: H + damp * mean(diag H) * I is not positive definite even with damp={retry} "
                     f"(first damp={damp}); allowed: a symmetric positive semi-definite H = (2/N) sum x x^T of "
                     f"real calibration inputs, or a larger damp")
  return u


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_size", "scale_dtype", "static"))
def _solve(w, u, static_scale, static_offset, group_of, *, bits, group_size, block_size, scale_dtype, static):
  """The column loop on W [in, out] (rows already permuted) with U [in, in]; returns (codes uint8 [in, out],
  scale, offset [ceil(in_padded / g), out]). With `static`, row r uses group group_of[r]'s precomputed
  (static_scale, static_offset); otherwise groups are r // g, their grid set when the loop reaches them."""
  n_in, n_out = w.shape
  maxq = 2**bits - 1
  bk = group_size * max(1, block_size // group_size)  # the column block: whole groups (one if groups are larger)
  n_blocks = -(-n_in // bk)
  n_pad = n_blocks * bk
  w = jnp.pad(w, [(0, n_pad - n_in), (0, 0)])
  u = jnp.eye(n_pad, dtype=jnp.float32).at[:n_in, :n_in].set(u)  # padded rows move no error
  n_groups_pad = n_pad // group_size if not static else static_scale.shape[0]
  if static:
    group_of = jnp.pad(group_of, (0, n_pad - n_in))
  scales = jnp.zeros((n_groups_pad, n_out), scale_dtype) if not static else static_scale
  offsets = jnp.zeros((n_groups_pad, n_out), scale_dtype) if not static else static_offset
  codes = jnp.zeros((n_pad, n_out), jnp.uint8)
  rows_in_group = jnp.arange(group_size)

  def column(i, carry):
    wb, eb, qb, scales, offsets, cur_s, cur_o, start = carry
    r = start + i
    if static:
      cur_s, cur_o = scales[group_of[r]], offsets[group_of[r]]
    else:
      def new_group(args):
        wb, scales, offsets = args
        rows = jax.lax.dynamic_slice_in_dim(wb, i, group_size, axis=0)
        valid = (r + rows_in_group < n_in)[:, None]
        s, o = grid(jnp.where(valid, rows, jnp.inf).min(axis=0), jnp.where(valid, rows, -jnp.inf).max(axis=0),
                    bits, scale_dtype)
        g = r // group_size
        return s, o, scales.at[g].set(s), offsets.at[g].set(o)

      cur_s, cur_o, scales, offsets = jax.lax.cond(
          r % group_size == 0, new_group, lambda args: (cur_s, cur_o, args[1], args[2]), (wb, scales, offsets))
    row = wb[i]
    q, wq = _quantize_row(row, cur_s, cur_o, maxq)
    u_blk = jax.lax.dynamic_slice(u, (r, start), (1, bk))[0]
    err = (row - wq) / u[r, r]
    wb = wb - u_blk[:, None] * err[None, :]  # rows j > i of the block: W_j -= U_ij e_i (U_ij = 0 for j < i)
    return wb, eb.at[i].set(err), qb.at[i].set(q.astype(jnp.uint8)), scales, offsets, cur_s, cur_o, start

  def block(b, carry):
    w, codes, scales, offsets = carry
    start = b * bk
    wb = jax.lax.dynamic_slice_in_dim(w, start, bk, axis=0)
    zeros = jnp.zeros((n_out,), scale_dtype)
    init = (wb, jnp.zeros_like(wb), jnp.zeros((bk, n_out), jnp.uint8), scales, offsets, zeros, zeros, start)
    _, eb, qb, scales, offsets, _, _, _ = jax.lax.fori_loop(0, bk, column, init)
    # Lazy update of the rows after the block: W_j -= sum_{i in block} U_ij e_i.
    u_rows = jax.lax.dynamic_slice_in_dim(u, start, bk, axis=0)  # [bk, n_pad]
    later = (jnp.arange(n_pad) >= start + bk)[:, None]
    w = w - jnp.where(later, u_rows.T @ eb, 0.0)
    codes = jax.lax.dynamic_update_slice_in_dim(codes, qb, start, axis=0)
    return w, codes, scales, offsets

  _, codes, scales, offsets = jax.lax.fori_loop(0, n_blocks, block, (w, codes, scales, offsets))
  return codes[:n_in], scales, offsets


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def static_grid(w, *, bits, group_size, scale_dtype):
  """(scale, offset) [ceil(in / g), out] of the contiguous groups of W [in, out], before any update."""
  pad = (-w.shape[0]) % group_size
  wg = jnp.pad(w, [(0, pad), (0, 0)], mode="edge").reshape(-1, group_size, w.shape[1])
  return grid(wg.min(axis=1), wg.max(axis=1), bits, scale_dtype)


def solve(w, h, *, bits: int = 4, group_size: int = 128, block_size: int = 128, damp: float = 0.01,
          act_order: bool = False, static_groups: bool = False, scale_dtype="float16"):
  """GPTQ of one layer: W [in, out] and H [in, in] -> (codes uint8 [in, out], scale, offset [ceil(in/g), out]).

  `group_size` must already be resolved (no -1). Raises ValueError if H + damp * mean(diag H) * I is not
  positive definite even after one retry with DAMP_RETRY_FACTOR times more damping.
  """
  if act_order and not static_groups:
    raise ValueError("act_order=True without static_groups=True makes non-contiguous groups; allowed: "
                     "act_order=False, or act_order=True with static_groups=True")
  sdt = jnp.dtype(scale_dtype)
  w = jnp.asarray(w, jnp.float32)
  h = jnp.asarray(h, jnp.float32)
  n_in = w.shape[0]
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  s0 = o0 = group_of = None
  if act_order:  # static groups: the grid of each contiguous group from the original W, then permute
    s0, o0 = static_grid(w, bits=bits, group_size=group_size, scale_dtype=sdt)
    perm = jnp.argsort(-jnp.diag(h))
    group_of = (perm // group_size).astype(jnp.int32)
    w, h = w[perm], h[perm][:, perm]
  u = damped_inverse_cholesky(h, damp)
  codes, scale, offset = _solve(w, u, s0, o0, group_of, bits=bits, group_size=group_size, block_size=block_size,
                                scale_dtype=sdt, static=act_order)
  if act_order:
    codes = codes[jnp.argsort(perm)]
  n_groups = num_groups(n_in, group_size)
  return codes, scale[:n_groups], offset[:n_groups]


@jax.jit
def output_relative_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """||X W - X W~||^2 / ||X W||^2 = tr(D^T H D) / tr(W^T H W), D = W - W~, for H proportional to X^T X."""
  w = w.astype(jnp.float32)
  d = w - w_hat.astype(jnp.float32)
  return jnp.sum(d * (h @ d)) / jnp.sum(w * (h @ w))


@register("gptq")
@dataclasses.dataclass(frozen=True)
class GPTQQuantizer(Quantizer):
  """GPTQ group-wise asymmetric INT-k; emits `int`-format QTensors (see the module docstring).

  Options: bits in (2, 3, 4, 8); group_size along `in` (-1: one group per output channel); block_size of the
  column loop; damp, the fraction of mean(diag H) added to the diagonal; act_order (visit inputs by
  decreasing H_ii; needs static_groups=True); static_groups; scale_dtype (float16 | float32).
  `quantize_with_hessian(w, h)` is GPTQ proper; `quantize(w)` uses H = I (round to nearest on GPTQ's grid).
  """

  bits: int = 4
  group_size: int = 128
  block_size: int = 128
  damp: float = 0.01
  act_order: bool = False
  static_groups: bool = False
  scale_dtype: str = "float16"

  group_offset = True  # format "int", asymmetric: w~ = scale * q + offset
  needs_calibration = True
  contract_settings = (
      dict(bits=4, group_size=32),
      dict(bits=3, group_size=48),  # 128 inputs: two groups of 48 and a short one of 32
      dict(bits=2, group_size=-1),
      dict(bits=8, group_size=32, scale_dtype="float32"),
      dict(bits=4, group_size=32, act_order=True, static_groups=True),
  )

  def __post_init__(self):
    check_choice("bits", self.bits, GPTQ_BITS)
    check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
    check_choice("act_order", self.act_order, (False, True))
    check_choice("static_groups", self.static_groups, (False, True))
    check_group_option(self.group_size)
    if not (isinstance(self.block_size, (int, np.integer)) and not isinstance(self.block_size, bool)
            and self.block_size > 0):
      raise ValueError(f"block_size={self.block_size!r} is not supported; allowed: a positive integer (128)")
    if not (isinstance(self.damp, (int, float)) and not isinstance(self.damp, bool) and 0 < self.damp < 1):
      raise ValueError(f"damp={self.damp!r} is not supported; allowed: a float in (0, 1) (0.01)")
    if self.act_order and not self.static_groups:
      raise ValueError("act_order=True without static_groups=True makes non-contiguous groups, which the `int` "
                       "QTensor format and QA-LoRA's pooling cannot represent; allowed: act_order=False, or "
                       "act_order=True with static_groups=True")

  def _quantize(self, w):
    return self.quantize_with_hessian(w, jnp.eye(w.shape[0], dtype=jnp.float32))

  def quantize_with_hessian(self, w, hessian) -> QTensor:
    """GPTQ of a float [in, out] kernel given its inputs' Hessian H = (2/N) sum x x^T [in, in]."""
    w = check_weight(w)
    self.check_shape(w.shape)
    n_in = w.shape[0]
    shape = getattr(hessian, "shape", None)
    if shape is None or tuple(shape) != (n_in, n_in):
      raise ValueError(f"hessian must be [in, in] = [{n_in}, {n_in}] for a weight of shape {list(w.shape)}, "
                       f"got shape {None if shape is None else list(shape)}")
    if not bool(jnp.isfinite(jnp.asarray(hessian)).all()):
      raise ValueError("hessian contains NaN or Inf; allowed: finite values")
    g = check_group_size(self.group_size, n_in)
    codes, scale, offset = solve(w, hessian, bits=self.bits, group_size=g, block_size=self.block_size,
                                 damp=self.damp, act_order=self.act_order, static_groups=self.static_groups,
                                 scale_dtype=self.scale_dtype)
    arrays = {"codes": packing.pack(codes, self.bits, np.uint32), "scale": scale, "offset": offset}
    return QTensor(arrays, QMeta("int", tuple(w.shape), self.bits, g, (("symmetric", False),)))

  dequantize = staticmethod(dequantize_affine)

  def error_bound(self, w, qt):
    """For `quantize(w)` (H = I, round to nearest): half a step plus rounding slack (intk.half_step_bound); the
    zero rounding moves the grid's ends by at most half a step, which the range's inclusion of 0 keeps inside
    the group's span."""
    return half_step_bound(w, qt, self.scale_dtype, eps_factor=4, tiny_factor=2**self.bits)
