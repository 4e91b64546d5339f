"""INT-k round-to-nearest: hand-derived values, the per-element error bound, storage, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from qalora_jax import quant


def test_hand_derived_two_bit_group():
  # One group of 4 inputs with values 0, 1, 2, 3 and another with -1, -1/3, 1/3, 1 (two output columns):
  # scale = (max - min) / 3, offset = min, codes 0..3, reconstruction exact.
  w = np.array([[0, -1], [1, -1 / 3], [2, 1 / 3], [3, 1]], np.float32)
  qt = quant.get("int", bits=2, group_size=4, scale_dtype="float32").quantize(w)
  np.testing.assert_allclose(np.asarray(qt["scale"]), [[1.0, 2 / 3]], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(qt["offset"]), [[0.0, -1.0]])
  np.testing.assert_array_equal(np.asarray(quant.unpack(qt["codes"], 2, 4)), [[0, 0], [1, 1], [2, 2], [3, 3]])
  np.testing.assert_allclose(np.asarray(qt.dequantize()), w, atol=1e-7)


def test_rounds_to_nearest_level():
  # Levels 0, 1, 2, 3 (scale 1, offset 0): 1.4 -> 1, 1.6 -> 2.
  w = np.array([[0.0], [1.4], [1.6], [3.0]], np.float32)
  qt = quant.get("int", bits=2, group_size=4).quantize(w)
  np.testing.assert_allclose(np.asarray(qt.dequantize())[:, 0], [0, 1, 2, 3])


def test_symmetric_uses_signed_grid_without_offset():
  w = np.array([[-1.0], [-0.5], [0.25], [1.0]], np.float32)
  qt = quant.get("int", bits=3, group_size=4, symmetric=True, scale_dtype="float32").quantize(w)
  assert "offset" not in qt.arrays
  np.testing.assert_allclose(np.asarray(qt["scale"]), [[1 / 3]], rtol=1e-7)  # absmax / (2^(k-1) - 1)
  np.testing.assert_allclose(np.asarray(qt.dequantize())[:, 0], [-1, -2 / 3, 1 / 3, 1], rtol=1e-6)


def test_short_last_group():
  # in = 6, g = 4: groups [0:4] and [4:6]; the second group has its own range.
  w = np.array([[0], [1], [2], [3], [10], [13]], np.float32)
  qt = quant.get("int", bits=2, group_size=4, scale_dtype="float32").quantize(w)
  assert qt["scale"].shape == (2, 1)
  np.testing.assert_allclose(np.asarray(qt["scale"])[:, 0], [1.0, 1.0])
  np.testing.assert_allclose(np.asarray(qt["offset"])[:, 0], [0.0, 10.0])
  np.testing.assert_allclose(np.asarray(qt.dequantize())[:, 0], w[:, 0])


@example(bits=2, group=4, symmetric=False, scale_dtype="float32",  # a range below float32's smallest normal
         w=np.array([[1.1754944e-38]] + [[0.0]] * 15, np.float32))
@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([4, 8, 16, -1]),
       symmetric=st.booleans(), scale_dtype=st.sampled_from(["float16", "float32"]),
       w=hnp.arrays(np.float32, st.tuples(st.sampled_from([16, 32]), st.integers(1, 5)),
                    elements=st.floats(-8, 8, width=32)))
def test_error_at_most_half_a_step(bits, group, symmetric, scale_dtype, w):
  quantizer = quant.get("int", bits=bits, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
  qt = quantizer.quantize(w)
  err = np.abs(np.asarray(qt.dequantize(jnp.float32)) - w)
  # scale / 2 per element, plus the storage-rounding slack documented in intk.py
  g = qt.group_size
  step = np.repeat(np.asarray(qt["scale"], np.float32), g, axis=0)[: w.shape[0]]
  m = np.repeat(np.abs(np.pad(w, [(0, (-w.shape[0]) % g), (0, 0)], mode="edge")).reshape(-1, g, w.shape[1]).max(1),
                g, axis=0)[: w.shape[0]]
  eps = np.finfo(np.dtype(scale_dtype)).eps
  tiny = max(np.finfo(np.dtype(scale_dtype)).smallest_subnormal, np.finfo(np.float32).smallest_normal)  # FTZ
  assert (err <= step / 2 + (2 * eps + 8 * np.finfo(np.float32).eps) * m + (2**bits - 1) * tiny).all()


@pytest.mark.parametrize("bits, group, shape, expected", [
    (4, 32, (1536, 64), 5.0), (4, 128, (1536, 64), 4.25), (3, 128, (1536, 64), 3.25), (2, 64, (1536, 64), 2.5),
    (4, 32, (576, 64), 5.0), (2, 64, (576, 64), 2.5),
])
def test_storage_bits_per_weight(bits, group, shape, expected):
  # k bits a weight + 2 x 16 bits (fp16 scale and offset) per group
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  qt = quant.get("int", bits=bits, group_size=group).quantize(w)
  assert qt.bits_per_weight == pytest.approx(expected)


@pytest.mark.parametrize("options, message", [
    (dict(bits=1), "bits=1 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8"),
    (dict(bits=16), "bits=16"),
    (dict(group_size=0), "group_size=0"),
    (dict(group_size=-2), "group_size=-2"),
    (dict(scale_dtype="float64"), "scale_dtype='float64'.*float16"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    quant.get("int", **options)


def test_group_larger_than_input_dim_is_rejected():
  with pytest.raises(ValueError, match=r"group_size=256 is not supported for input dimension 128; allowed: "
                                       r"an integer in 1..128, or -1"):
    quant.get("int", group_size=256).quantize(np.zeros((128, 4), np.float32))
