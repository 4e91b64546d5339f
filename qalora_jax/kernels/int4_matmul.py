"""A Pallas kernel for y = x W~ with W~ an INT4 group-wise QTensor (format "int", with offsets), on GPU.

W~[i, o] = scale[l, o] * q[i, o] + offset[l, o] for i in group l. The kernel reads the packed codes (8 four-bit
codes per uint32 word along `in`, code 8w + j in bits [4j, 4j + 4) of word w: see quant/packing.py), never a
float copy of W: each program computes a [block_m, block_n] tile of y, looping over `in` in steps of
block_k inputs (a whole number of groups and of words):

    acc += x[:, k-block] @ (q[k-block, n-block] * scale + offset)        # dequantized in registers

`interpret=True` runs the same kernel through Pallas' interpreter (any backend; the tests check it against
`x @ qt.dequantize()` on CPU). `int4_matmul` falls back to that reference where the shapes do not tile
(a ragged last group, `in` not a multiple of block_k, `out` not a multiple of block_n).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qalora_jax.quant import QTensor

CODES_PER_WORD = 8


def supported(qt: QTensor, block_n: int = 64, block_k: int = 128) -> bool:
  """Whether the kernel handles `qt` with these blocks (else `int4_matmul` uses the reference path)."""
  n_in, n_out = qt.shape
  return (qt.format == "int" and qt.bits == 4 and "offset" in qt.arrays and qt["codes"].ndim == 2
          and block_k % qt.group_size == 0 and block_k % CODES_PER_WORD == 0 and n_in % block_k == 0
          and n_out % block_n == 0)


def _kernel(x_ref, codes_ref, scale_ref, offset_ref, o_ref, *, block_k: int, group_size: int, n_in: int):
  block_m, block_n = o_ref.shape
  words_k, groups_k = block_k // CODES_PER_WORD, block_k // group_size
  shifts = (jnp.arange(CODES_PER_WORD, dtype=jnp.uint32) * 4)[None, :, None]

  def body(k, acc):
    x = x_ref[:, pl.ds(k * block_k, block_k)].astype(jnp.float32)
    words = codes_ref[pl.ds(k * words_k, words_k), :]
    q = ((words[:, None, :] >> shifts) & 0xF).astype(jnp.float32).reshape(groups_k, group_size, block_n)
    scale = scale_ref[pl.ds(k * groups_k, groups_k), :].astype(jnp.float32)
    offset = offset_ref[pl.ds(k * groups_k, groups_k), :].astype(jnp.float32)
    w = (q * scale[:, None, :] + offset[:, None, :]).reshape(block_k, block_n)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, n_in // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def int4_matmul(x: jax.Array, qt: QTensor, *, block_m: int = 16, block_n: int = 64, block_k: int = 128,
                interpret: bool = False) -> jax.Array:
  """x [..., in] @ dequantize(qt) [in, out] -> [..., out] in x's dtype, reading the packed INT4 codes."""
  n_in, n_out = qt.shape
  if x.shape[-1] != n_in:
    raise ValueError(f"x has {x.shape[-1]} features; the weight expects in={n_in}")
  if not supported(qt, block_n, block_k):
    return jnp.einsum("...i,io->...o", x, qt.dequantize(x.dtype))
  lead = x.shape[:-1]
  x2 = x.reshape(-1, n_in)
  m = x2.shape[0]
  padded = -(-m // block_m) * block_m
  x2 = jnp.pad(x2, ((0, padded - m), (0, 0)))
  kernel = functools.partial(_kernel, block_k=block_k, group_size=qt.group_size, n_in=n_in)
  groups = qt["scale"].shape[0]
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((padded, n_out), x.dtype),
      grid=(padded // block_m, n_out // block_n),
      in_specs=[
          pl.BlockSpec((block_m, n_in), lambda i, j: (i, 0)),
          pl.BlockSpec((n_in // CODES_PER_WORD, block_n), lambda i, j: (0, j)),
          pl.BlockSpec((groups, block_n), lambda i, j: (0, j)),
          pl.BlockSpec((groups, block_n), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      interpret=interpret,
  )(x2, qt["codes"], qt["scale"], qt["offset"])
  return y[:m].reshape(*lead, n_out)
