"""NF4 / FP4 against bitsandbytes: codes and dequantized values bit-identical, with and without double
quantization, on random and real SmolLM2 weights. Needs bitsandbytes (installed by the test extra)."""

import numpy as np
import pytest

from qalora_jax import quant
from qalora_jax.quant import nf4

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(w_in_out, quant_type, block_size, double_quant):
  """bitsandbytes on the torch [out, in] layout; returns (codes [in, out], dequantized [in, out], state)."""
  t = torch.from_numpy(np.ascontiguousarray(w_in_out.T))
  packed, state = bnb_f.quantize_4bit(t, blocksize=block_size, compress_statistics=double_quant,
                                      quant_type=quant_type)
  p = packed.numpy().reshape(-1)
  codes = np.stack([p >> 4, p & 15], axis=1).reshape(t.shape).T  # first element in the high nibble
  deq = bnb_f.dequantize_4bit(packed, state).numpy().T
  return codes, deq, state


def assert_same_as_bnb(w, quant_type, block_size, double_quant):
  qt = quant.get(quant_type, block_size=block_size, double_quant=double_quant).quantize(w)
  codes, deq, state = bnb_quantize(w, quant_type, block_size, double_quant)
  np.testing.assert_array_equal(np.asarray(quant.unpack(qt["codes"], 4, w.shape[0])), codes)
  np.testing.assert_array_equal(np.asarray(qt.dequantize()), deq)
  if double_quant:
    np.testing.assert_array_equal(np.asarray(qt["absmax_codes"]).T.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(qt["absmax_scale"]), state.state2.absmax.numpy())
    assert float(qt["absmax_offset"]) == float(state.offset)


def test_code_tables_match():
  np.testing.assert_array_equal(nf4.NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(nf4.FP4_CODE, bnb_f.get_4bit_type("fp4", device="cpu").numpy())
  np.testing.assert_array_equal(nf4.DYNAMIC_MAP, bnb_f.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("n", [1, 5, 7, 8, 9, 63, 64, 65, 1000, 13824, 32768])
def test_cascade_sum_matches_torch(n):
  x = np.random.default_rng(n).random(n).astype(np.float32) * 0.1
  assert nf4.cascade_sum_f32(x) == torch.from_numpy(x).sum().item()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, block_size", [((576, 192), 64), ((1536, 96), 64), ((128, 40), 32), ((256, 3), 128)])
def test_random_weights(quant_type, double_quant, shape, block_size):
  rng = np.random.default_rng(sum(shape))
  w = (rng.standard_t(4, size=shape) * 0.02).astype(np.float32)
  w[:2, :3] = 0.0  # exact zeros take the +-0 codes
  assert_same_as_bnb(w, quant_type, block_size, double_quant)


@pytest.mark.real_model
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_real_weights(smollm2_kernels, quant_type, double_quant):
  for name, w in smollm2_kernels.items():
    assert_same_as_bnb(w, quant_type, 64, double_quant)


def test_nf4_double_quant_storage():
  # 4 bits + 8 bits / 64 (absmax codes) + 32 bits / (64 * 256) (absmax2) + one float32 offset
  w = np.random.default_rng(0).normal(size=(1536, 576)).astype(np.float32)
  qt = quant.get("nf4", block_size=64, double_quant=True).quantize(w)
  expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.size
  assert qt.bits_per_weight == pytest.approx(expected)
  assert qt.bits_per_weight == pytest.approx(4.127, abs=5e-4)


def test_block_size_must_divide_input_dim():
  with pytest.raises(ValueError, match="block_size=64 must divide the input dimension 96; allowed: 32"):
    quant.get("nf4").quantize(np.zeros((96, 4), np.float32))
  with pytest.raises(ValueError, match="block_size=48 is not supported; allowed: 32, 64"):
    quant.get("fp4", block_size=48)
