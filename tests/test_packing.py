"""Bit packing: identity, density, and the documented bit layout."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qalora_jax.quant import packing


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(packing.SUPPORTED_BITS), dtype=st.sampled_from([np.uint8, np.uint32]),
       n=st.integers(1, 97), cols=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_unpack_inverts_pack(bits, dtype, n, cols, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(n, cols)).astype(np.uint8)
  packed = packing.pack(codes, bits, dtype)
  assert packed.dtype == dtype
  assert packed.shape == (packing.packed_length(n, bits, dtype), cols)
  np.testing.assert_array_equal(packing.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype, word", [(np.uint8, 8), (np.uint32, 32)])
def test_packing_is_dense(bits, dtype, word):
  n = 96 * 8  # a multiple of every chunk: no padding
  assert packing.packed_length(n, bits, dtype) * word == n * bits


def test_four_bit_layout_lowest_nibble_first():
  codes = np.arange(1, 9, dtype=np.uint8)[:, None]  # 1..8
  assert int(packing.pack(codes, 4, np.uint32)[0, 0]) == 0x87654321
  assert [int(b) for b in packing.pack(codes, 4, np.uint8)[:, 0]] == [0x21, 0x43, 0x65, 0x87]


def test_three_bit_codes_straddle_words():
  # 32 three-bit codes = 96 bits = 3 words; code 10 occupies bits 30..32 (two words).
  codes = np.zeros((32, 1), np.uint8)
  codes[10] = 0b111
  words = np.asarray(packing.pack(codes, 3, np.uint32))[:, 0]
  assert words.shape == (3,)
  assert int(words[0]) == 0b11 << 30 and int(words[1]) == 0b1 and int(words[2]) == 0


def test_bad_bits_and_dtype():
  with pytest.raises(ValueError, match="bits=9"):
    packing.pack(np.zeros((4, 1), np.uint8), 9)
  with pytest.raises(ValueError, match="uint8, uint32"):
    packing.packed_length(4, 4, np.int16)
