"""A Pallas kernel for y = x W~ and dx = dy W~^T with W~ an INT4 group-wise QTensor (format "int", with offsets).

W~[i, o] = scale[l, o] * q[i, o] + offset[l, o] for i in group l. The kernel reads the packed codes (8 four-bit
codes per uint32 word along `in`, code 8w + j in bits [4j, 4j + 4) of word w: see quant/packing.py), never a
float copy of W. Program (r, c, s) of the grid computes a [block_m, block_n] tile of the output from the s-th of
`splits` equal slices of the reduction axis, in steps of block_k:

    forward   acc += x[:, k-block] @ dequant(q[k-block, n-block])          (reduction over `in`)
    backward  acc += dy[:, k-block] @ dequant(q[n-block, k-block])^T       (reduction over `out`)

dequantized in registers (in float32, then cast to the operand dtype: x's dtype, so bf16 operands stay bf16)
and accumulated in float32. With splits > 1 each slice writes a float32 partial tile and the slices are summed
outside the kernel (split-K, for outputs too narrow to give the grid enough programs). A block inside one group
loads one scale row; a block holding several groups loads one row per group.

`choose_blocks` picks the blocks per shape within what Triton compiles: every loaded slice a power of two and
every dot at least 16 in each dimension. The kernel lowers through Pallas' Triton backend (Triton compiler
parameters); Pallas' default GPU backend, Mosaic GPU, wants another kernel style (experiments/gpu/check.py
records what each does with this one). `interpret=True` runs the same kernel through Pallas' interpreter on any
backend (the tests check it against float64 on CPU). `int4_matmul` falls back to `x @ qt.dequantize()` where
no blocks fit.

`dispatch` is how the model uses it (nn/linear.py's base_matmul, forward and backward): on CUDA GPUs, for an
eligible QTensor and at most KERNEL_MAX_ROWS rows, chosen with lax.platform_dependent when lowering, so every
other backend compiles XLA's dequantize-then-dot exactly as before. QALORA_GPU_KERNELS=0 in the environment
keeps GPUs on XLA's path too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qalora_jax.quant import QTensor

CODES_PER_WORD = 8
MIN_DOT = 16  # Triton's smallest dot: 16 in each dimension
TARGET_PROGRAMS = 256  # split-K until the grid has this many programs (about two per multiprocessor of an H100)
MAX_BLOCK_M, MAX_BLOCK_N, MAX_BLOCK_K = 128, 64, 128
# Up to 16 rows: 4 KB of codes a step in rows of up to 1 KB, about 3.4 programs per multiprocessor of an H200
DECODE_STEP_CODES, DECODE_MAX_OUT_BLOCK, DECODE_PROGRAMS = 8192, 256, 448


@dataclasses.dataclass(frozen=True)
class Blocks:
  """A tiling: [block_m, block_n] output tiles, block_k reduction steps, `splits` slices of the reduction;
  Triton's `warps` and pipeline `stages` (None: 4 warps for tiles up to 64 x 64, else 8; 2 stages).

  block_m = 1 is the single-row form: no dot, acc[n] += sum_k x[k] W~[k, n] as float32 products and sums.
  """

  block_m: int
  block_n: int
  block_k: int
  splits: int = 1
  warps: int | None = None
  stages: int | None = None


def _pow2_at_most(limit: int, divides: int) -> int:
  """The largest power of two <= limit that divides `divides` (1 if none above it)."""
  b = 1
  while b * 2 <= limit and divides % (b * 2) == 0:
    b *= 2
  return b


def _group_fits(block: int, group_size: int) -> bool:
  """Whether a block along `in` lies inside one group or holds whole groups."""
  return group_size % block == 0 or block % group_size == 0


def _eligible(qt) -> bool:
  return (isinstance(qt, QTensor) and qt.format == "int" and qt.bits == 4 and "offset" in qt.arrays
          and qt["codes"].ndim == 2)


def blocks_fit(qt: QTensor, blocks: Blocks, *, transpose: bool = False) -> bool:
  """Whether `blocks` tile `qt` (for dy W~^T if `transpose`) within Triton's limits."""
  if not _eligible(qt):
    return False
  n_in, n_out = qt.shape
  g = qt.group_size
  reduce, width = (n_out, n_in) if transpose else (n_in, n_out)
  in_block = blocks.block_n if transpose else blocks.block_k  # the block that runs along `in`
  pow2 = all(b & (b - 1) == 0 for b in (blocks.block_m, blocks.block_n, blocks.block_k))
  return (pow2 and min(blocks.block_n, blocks.block_k) >= MIN_DOT
          and (blocks.block_m == 1 or blocks.block_m >= MIN_DOT)
          and in_block % CODES_PER_WORD == 0 and _group_fits(in_block, g) and g % CODES_PER_WORD == 0
          and width % blocks.block_n == 0 and reduce % (blocks.block_k * blocks.splits) == 0)


def choose_blocks(m: int, qt: QTensor, *, transpose: bool = False) -> Blocks | None:
  """Blocks for an [m, in] @ W~ (or [m, out] @ W~^T) product, None if none fit.

  block_m: the rows rounded up to a power of two (16 to 128). Up to 16 rows (decoding), as tuned on an H200
  (experiments/gpu/tune_int4.py): the block along `out`, where the codes are contiguous, the largest power of two
  up to 256 that leaves 32 column blocks (at least 64), the block along `in` DECODE_STEP_CODES / that (32 to
  128), 3 pipeline stages, DECODE_PROGRAMS programs. More rows: block_n and block_k the largest powers of two up
  to 64 and 128 that divide the output and reduction widths, TARGET_PROGRAMS programs. Blocks along `in` shrink
  until they fit the groups; splits: the fewest divisors of the reduction steps that give the programs (or as
  many as there are steps).
  """
  if not _eligible(qt):
    return None
  n_in, n_out = qt.shape
  g = qt.group_size
  reduce, width = (n_out, n_in) if transpose else (n_in, n_out)
  block_m = min(MAX_BLOCK_M, max(MIN_DOT, 1 << max(0, m - 1).bit_length()))
  if block_m == MIN_DOT:
    out_block = _pow2_at_most(DECODE_MAX_OUT_BLOCK, n_out)
    while out_block > 64 and n_out // out_block < 32:
      out_block //= 2
    in_block = _pow2_at_most(max(32, min(128, DECODE_STEP_CODES // out_block)), n_in)
    block_n, block_k = (in_block, out_block) if transpose else (out_block, in_block)
    target, stages = DECODE_PROGRAMS, 3
  else:
    block_n = _pow2_at_most(MAX_BLOCK_N, width)
    block_k = _pow2_at_most(MAX_BLOCK_K, reduce)
    target, stages = TARGET_PROGRAMS, None
  # The block along `in` must lie inside a group or hold whole groups: shrink it until it does.
  if transpose:
    while block_n >= MIN_DOT and not _group_fits(block_n, g):
      block_n //= 2
  else:
    while block_k >= MIN_DOT and not _group_fits(block_k, g):
      block_k //= 2
  blocks = Blocks(block_m, block_n, block_k, stages=stages)
  if not blocks_fit(qt, blocks, transpose=transpose):
    return None
  programs = -(-m // block_m) * (width // block_n)
  steps = reduce // block_k
  splits = next((d for d in range(1, steps + 1) if steps % d == 0 and programs * d >= target), steps)
  return dataclasses.replace(blocks, splits=splits)


def supported(qt: QTensor, block_n: int | None = None, block_k: int | None = None, *,
              transpose: bool = False) -> bool:
  """Whether the kernel handles `qt` (with these blocks, else with the chosen ones) rather than the fallback."""
  chosen = choose_blocks(1, qt, transpose=transpose)
  if chosen is None:
    return False
  blocks = dataclasses.replace(chosen, block_n=block_n or chosen.block_n, block_k=block_k or chosen.block_k,
                               splits=1)
  return blocks_fit(qt, blocks, transpose=transpose)


def _unpack(words: jax.Array) -> jax.Array:
  """[w, n] uint32 words -> [8w, n] float32 codes (code 8w + j in bits [4j, 4j + 4) of word w)."""
  shifts = (jnp.arange(CODES_PER_WORD, dtype=jnp.uint32) * 4)[None, :, None]
  q = (words[:, None, :] >> shifts) & 0xF
  return q.astype(jnp.float32).reshape(words.shape[0] * CODES_PER_WORD, words.shape[1])


def _dequant(words, scale_ref, offset_ref, start: int | jax.Array, rows: int, cols, group_size: int):
  """W~ rows [start, start + rows) (in float32) of the column slice `cols`, from their packed words."""
  q = _unpack(words)
  if group_size >= rows:  # one group: one scale row
    row = pl.ds(start // group_size, 1)
    return q * scale_ref[row, cols].astype(jnp.float32) + offset_ref[row, cols].astype(jnp.float32)
  groups = rows // group_size
  row = pl.ds(start // group_size, groups)
  scale = scale_ref[row, cols].astype(jnp.float32)[:, None, :]
  offset = offset_ref[row, cols].astype(jnp.float32)[:, None, :]
  q = q.reshape(groups, group_size, q.shape[-1])
  return (q * scale + offset).reshape(rows, q.shape[-1])


def _forward_kernel(x_ref, codes_ref, scale_ref, offset_ref, o_ref, *, blocks: Blocks, group_size: int,
                    steps: int):
  """o = x[:, slice s] @ W~[slice s, n-block]; x's block holds every input, codes/scale/offset one n-block."""
  bk = blocks.block_k
  start0 = pl.program_id(2) * (steps * bk)
  cols = pl.ds(0, blocks.block_n)

  def body(k, acc):
    start = pl.multiple_of(start0 + k * bk, bk)
    x = x_ref[:, pl.ds(start, bk)]
    words = codes_ref[pl.ds(start // CODES_PER_WORD, bk // CODES_PER_WORD), :]
    w = _dequant(words, scale_ref, offset_ref, start, bk, cols, group_size).astype(x.dtype)
    if blocks.block_m == 1:  # x [1, bk]: products and a sum over k, no dot
      return acc + jnp.sum(x[0].astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0)[None, :]
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _transposed_kernel(dy_ref, codes_ref, scale_ref, offset_ref, o_ref, *, blocks: Blocks, group_size: int,
                       steps: int):
  """o = dy[:, slice s] @ W~[n-block, slice s]^T; codes/scale/offset hold every output column."""
  bn, bk = blocks.block_n, blocks.block_k
  n_start = pl.program_id(1) * bn
  start0 = pl.program_id(2) * (steps * bk)
  words_rows = pl.ds(0, bn // CODES_PER_WORD)  # the codes block holds this n-block's words only

  def body(k, acc):
    start = pl.multiple_of(start0 + k * bk, bk)
    cols = pl.ds(start, bk)
    dy = dy_ref[:, cols]
    w = _dequant(codes_ref[words_rows, cols], scale_ref, offset_ref, n_start, bn, cols, group_size)
    w = w.astype(dy.dtype)
    if blocks.block_m == 1:  # dy [1, bk]: products and a sum over k, no dot
      return acc + jnp.sum(w.astype(jnp.float32) * dy[0].astype(jnp.float32)[None, :], axis=1)[None, :]
    return acc + jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


BACKENDS = ("triton", "default")


@functools.cache
def triton_available() -> bool:
  """Whether this JAX has Pallas' Triton backend (its compiler parameters), which `dispatch` lowers through."""
  try:
    from jax.experimental.pallas import triton as pl_triton
  except ImportError:
    return False
  return hasattr(pl_triton, "CompilerParams")


def _compiler_params(blocks: Blocks, backend: str):
  """Triton's compiler parameters (backend "triton"), or None: Pallas' own GPU default (backend "default")."""
  if backend == "default":
    return None
  from jax.experimental.pallas import triton as pl_triton
  warps = blocks.warps or (4 if blocks.block_m * blocks.block_n <= 64 * 64 else 8)
  return pl_triton.CompilerParams(num_warps=warps, num_stages=blocks.stages or 2)


@functools.partial(jax.jit, static_argnames=("transpose", "blocks", "block_m", "block_n", "block_k", "splits",
                                             "out_dtype", "backend", "interpret"))
def int4_matmul(x: jax.Array, qt: QTensor, *, transpose: bool = False, blocks: Blocks | None = None,
                block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                splits: int | None = None, out_dtype=None, backend: str = "triton",
                interpret: bool = False) -> jax.Array:
  """x [..., in] @ W~ [in, out] -> [..., out] (transpose: x [..., out] @ W~^T -> [..., in]) in `out_dtype`
  (None: x's dtype), the operands in x's dtype, accumulated in float32.

  Blocks are `blocks`, else `choose_blocks` with any of block_m, block_n, block_k, splits overriding it.
  `backend` picks the GPU lowering: "triton" (Triton compiler parameters) or "default" (none: Pallas' default).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
  n_in, n_out = qt.shape
  reduce, width = (n_out, n_in) if transpose else (n_in, n_out)
  if x.shape[-1] != reduce:
    side = "out" if transpose else "in"
    raise ValueError(f"x has {x.shape[-1]} features; the weight expects {side}={reduce}")
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, reduce)
  m = x2.shape[0]
  if blocks is None:
    chosen = choose_blocks(m, qt, transpose=transpose)
    if chosen is not None:
      overrides = dict(block_m=block_m, block_n=block_n, block_k=block_k,
                       splits=1 if (block_n or block_k) and splits is None else splits)
      blocks = dataclasses.replace(chosen, **{k: v for k, v in overrides.items() if v is not None})
  if blocks is None or not blocks_fit(qt, blocks, transpose=transpose):
    w = qt.dequantize(x.dtype)
    spec = "...o,io->...i" if transpose else "...i,io->...o"
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(out_dtype)
  bm, bn, bk, splits = blocks.block_m, blocks.block_n, blocks.block_k, blocks.splits
  padded = -(-m // bm) * bm
  x2 = jnp.pad(x2, ((0, padded - m), (0, 0)))
  col_blocks = width // bn
  steps = reduce // (bk * splits)
  groups = qt["scale"].shape[0]
  if transpose:  # codes [in/8, out]: a program reads its n-block's rows of words, every column
    kernel = _transposed_kernel
    weight_specs = [pl.BlockSpec((bn // CODES_PER_WORD, n_out), lambda i, j, s: (j, 0)),
                    pl.BlockSpec((groups, n_out), lambda i, j, s: (0, 0)),
                    pl.BlockSpec((groups, n_out), lambda i, j, s: (0, 0))]
  else:  # a program reads every row of words of its n-block of columns
    kernel = _forward_kernel
    weight_specs = [pl.BlockSpec((n_in // CODES_PER_WORD, bn), lambda i, j, s: (0, j)),
                    pl.BlockSpec((groups, bn), lambda i, j, s: (0, j)),
                    pl.BlockSpec((groups, bn), lambda i, j, s: (0, j))]
  y = pl.pallas_call(
      functools.partial(kernel, blocks=blocks, group_size=qt.group_size, steps=steps),
      out_shape=jax.ShapeDtypeStruct((padded, splits * width), out_dtype if splits == 1 else jnp.float32),
      grid=(padded // bm, col_blocks, splits),
      in_specs=[pl.BlockSpec((bm, reduce), lambda i, j, s: (i, 0)), *weight_specs],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, s: (i, s * col_blocks + j)),
      compiler_params=None if interpret else _compiler_params(blocks, backend),
      interpret=interpret,
  )(x2, qt["codes"], qt["scale"], qt["offset"])
  if splits > 1:
    y = y.reshape(padded, splits, width).sum(axis=1).astype(out_dtype)
  return y[:m].reshape(*lead, width)


# base_matmul runs the kernel on GPUs for at most this many rows (decoding, short prompts): on an H200 it was
# ahead of XLA's dequantize-then-dot on every SmolLM2-135M and 8B-class shape at 1 and 16 rows, and behind on
# some SmolLM2 shapes from 32 rows on (experiments/gpu/results/2026-11-30-h200*).
KERNEL_MAX_ROWS = 16


def uses_kernel(x_shape, kernel, *, transpose: bool = False) -> bool:
  """Whether `dispatch` stages the kernel for x of this shape: an eligible QTensor, blocks that fit, at most
  KERNEL_MAX_ROWS rows (every block of rows dequantizes W again), Pallas' Triton backend present, and the
  environment variable QALORA_GPU_KERNELS not "0" (read when tracing)."""
  m = math.prod(x_shape[:-1])
  return (0 < m <= KERNEL_MAX_ROWS and os.environ.get("QALORA_GPU_KERNELS") != "0"
          and choose_blocks(m, kernel, transpose=transpose) is not None and triton_available())


def dispatch(x: jax.Array, kernel, operand_dtype, xla, *, transpose: bool = False) -> jax.Array:
  """`xla(x, kernel)` (the dequantize-then-dot) except on CUDA GPUs where `uses_kernel`: there x (cast to
  operand_dtype) @ W~ (transpose: W~^T) by `int4_matmul`, out in x's dtype. Chosen when lowering
  (lax.platform_dependent), so any other backend compiles exactly `xla`."""
  if not uses_kernel(x.shape, kernel, transpose=transpose):
    return xla(x, kernel)

  def gpu(x, kernel):
    return int4_matmul(x.astype(operand_dtype), kernel, transpose=transpose, out_dtype=x.dtype)

  try:
    jax.eval_shape(gpu, x, kernel)  # the kernel traced once here (int4_matmul's jit keeps the trace)
  except (NotImplementedError, TypeError, ValueError) as e:  # a Pallas API this JAX lacks: XLA's path, said
    warnings.warn(f"the Pallas INT4 kernel does not trace with jax {jax.__version__} ({type(e).__name__}: {e}); "
                  f"using XLA's dequantize-then-dot", stacklevel=3)
    return xla(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cuda=gpu, default=xla)
