"""Bit packing of k-bit codes into uint8 or uint32 words along the first axis.

Codes c[0], c[1], ... of `bits` bits each are laid end to end, least significant bits first:
code i occupies bits [i * bits, (i + 1) * bits) of the packed stream, and word j holds stream bits
[j * W, (j + 1) * W) for a W-bit word. So 8 four-bit codes fill one uint32 word with code 0 in the lowest
nibble (the GPTQ `qweight` order), and 32 three-bit codes fill exactly three uint32 words: 3 bits a weight,
no padding inside a chunk. A chunk is the smallest run of codes that ends on a word boundary,
lcm(bits, W) / bits codes; the code axis is padded with zeros to a whole number of chunks, so `unpack`
needs the original length.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_WORD_BITS = {np.dtype(np.uint8): 8, np.dtype(np.uint32): 32}


def _layout(bits: int, dtype) -> tuple[int, int, int]:
  """Returns (word_bits, codes_per_chunk, words_per_chunk)."""
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits!r} cannot be packed; allowed: {', '.join(map(str, SUPPORTED_BITS))}")
  dtype = np.dtype(dtype)
  if dtype not in _WORD_BITS:
    raise ValueError(f"dtype={dtype} is not a packing word type; allowed: uint8, uint32")
  word_bits = _WORD_BITS[dtype]
  chunk_bits = math.lcm(bits, word_bits)
  return word_bits, chunk_bits // bits, chunk_bits // word_bits


def packed_length(n: int, bits: int, dtype=np.uint32) -> int:
  """Number of words that hold `n` codes of `bits` bits."""
  _, codes_per_chunk, words_per_chunk = _layout(bits, dtype)
  return -(-n // codes_per_chunk) * words_per_chunk


@functools.partial(jax.jit, static_argnames=("bits", "dtype"))
def pack(codes, bits: int, dtype=np.uint32):
  """Packs integer codes in [0, 2**bits) along axis 0: [n, ...] -> [packed_length(n), ...] words."""
  word_bits, per_chunk, words = _layout(bits, dtype)
  codes = jnp.asarray(codes)
  n, rest = codes.shape[0], codes.shape[1:]
  pad = (-n) % per_chunk
  c = jnp.pad(codes.astype(dtype), [(0, pad)] + [(0, 0)] * len(rest))
  c = c.reshape((-1, per_chunk) + rest)
  out = [jnp.zeros((c.shape[0],) + rest, dtype) for _ in range(words)]
  for i in range(per_chunk):
    word, shift = divmod(i * bits, word_bits)
    out[word] = out[word] | (c[:, i] << shift)  # bits past the word's top fall off
    if shift + bits > word_bits:  # the code straddles two words: its high bits start the next one
      out[word + 1] = out[word + 1] | (c[:, i] >> (word_bits - shift))
  return jnp.stack(out, axis=1).reshape((-1,) + rest)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(packed, bits: int, n: int):
  """Inverse of `pack`: [packed_length(n), ...] words -> [n, ...] uint8 codes."""
  packed = jnp.asarray(packed)
  word_bits, per_chunk, words = _layout(bits, packed.dtype)
  rest = packed.shape[1:]
  p = packed.reshape((-1, words) + rest)
  mask = jnp.asarray((1 << bits) - 1, packed.dtype)
  if words == 1:  # no code straddles two words: one broadcast shift (fuses and vectorises well)
    shifts = jnp.arange(per_chunk, dtype=packed.dtype).reshape((1, per_chunk) + (1,) * len(rest)) * bits
    return ((p >> shifts) & mask).reshape((-1,) + rest)[:n].astype(jnp.uint8)
  codes = []
  for i in range(per_chunk):
    word, shift = divmod(i * bits, word_bits)
    c = p[:, word] >> shift
    if shift + bits > word_bits:
      c = c | (p[:, word + 1] << (word_bits - shift))
    codes.append(c & mask)
  return jnp.stack(codes, axis=1).reshape((-1,) + rest)[:n].astype(jnp.uint8)
