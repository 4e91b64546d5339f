"""GPTQ-layout checkpoints: AutoGPTQ v1 packing on hand-made examples, export -> import round trips (integer
and float zeros), rounding of merged offsets, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qalora_jax import models, quant
from qalora_jax.export import gptq as gptq_export
from qalora_jax.train.loop import tiny_model


def autogptq_pack(values, bits):
  """AutoGPTQ v1's packing rule written out word by word, for values [n] (n a multiple of 32):
  2/4/8 bits: 32/bits values per word, value j of the word at bits [bits*j, bits*(j+1));
  3 bits: 32 values in 3 words; values 10 and 21 straddle the word boundaries."""
  v = [int(x) for x in values]
  words = []
  if bits in (2, 4, 8):
    per = 32 // bits
    for start in range(0, len(v), per):
      words.append(sum(v[start + j] << (bits * j) for j in range(per)))
  else:
    for s in range(0, len(v), 32):
      c = v[s:s + 32]
      w0 = sum(c[j] << (3 * j) for j in range(10)) | ((c[10] & 0x3) << 30)
      w1 = (c[10] >> 2) | sum(c[11 + j] << (3 * j + 1) for j in range(10)) | ((c[21] & 0x1) << 31)
      w2 = (c[21] >> 1) | sum(c[22 + j] << (3 * j + 2) for j in range(10))
      words += [w0, w1, w2]
  return np.array(words, np.uint32).view(np.int32)


def test_hand_made_4bit_word():
  words = gptq_export.pack_words(np.arange(8)[:, None], 4, axis=0)
  assert words.shape == (1, 1) and words.dtype == np.int32
  assert words[0, 0] == 0x76543210  # value 0 in the lowest nibble


def test_hand_made_3bit_words_straddle_like_autogptq():
  values = np.zeros(32, np.int64)
  values[10] = 0b101  # bits 30-31 of word 0 hold 0b01, bit 0 of word 1 holds 1
  values[21] = 0b011  # bit 31 of word 1 holds 1, bits 0-1 of word 2 hold 0b01
  words = gptq_export.pack_words(values[:, None], 3, axis=0)[:, 0].view(np.uint32)
  assert [hex(w) for w in words] == [hex(0b01 << 30), hex(1 | (1 << 31)), hex(0b01)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_the_autogptq_rule(bits):
  rng = np.random.default_rng(bits)
  values = rng.integers(0, 2**bits, size=(64, 3))
  words = gptq_export.pack_words(values, bits, axis=0)
  for col in range(3):
    np.testing.assert_array_equal(words[:, col], autogptq_pack(values[:, col], bits))
  np.testing.assert_array_equal(gptq_export.unpack_words(words, bits, 64, axis=0), values)
  # qzeros pack along the output axis with the same rule
  zeros = gptq_export.pack_words(values.T, bits, axis=1)
  np.testing.assert_array_equal(zeros[1], autogptq_pack(values[:, 1], bits))


def test_pack_refuses_partial_words():
  with pytest.raises(ValueError, match="allowed: a multiple of 32"):
    gptq_export.pack_words(np.zeros((40, 1)), 3, axis=0)


@pytest.fixture(scope="module")
def tiny():
  return tiny_model()


def integer_zero_model(params, bits, group_size):
  """Block linears as `int` QTensors with integer zeros (round to nearest, then zeros rounded): what GPTQ emits."""
  frozen, _ = models.quantize_params(params, quant.get("int", bits=bits, group_size=group_size))
  return gptq_export.round_zeros(frozen)


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gptq_export_matches_the_v1_layout(tiny, tmp_path):
  frozen, _ = models.quantize_params(tiny.params, quant.get("gptq", bits=4, group_size=32))
  out = gptq_export.export_gptq(frozen, tmp_path / "ckpt", config=tiny.config)
  config = json.loads((out / "quantize_config.json").read_text())
  assert config["bits"] == 4 and config["group_size"] == 32 and config["sym"] is False
  assert config["desc_act"] is False and config["checkpoint_format"] == "gptq"
  assert json.loads((out / "config.json").read_text())["quantization_config"] == config
  t = load_file(str(out / "model.safetensors"))
  qt = jax.tree.map(lambda a: a[1], frozen["blocks"]["mlp"]["down_proj"]["kernel"])  # layer 1, [128, 64]
  prefix = "model.layers.1.mlp.down_proj"
  qweight, scales, qzeros, g_idx = (t[f"{prefix}.{k}"] for k in ("qweight", "scales", "qzeros", "g_idx"))
  assert qweight.dtype == np.int32 and qweight.shape == (128 * 4 // 32, 64)
  assert scales.dtype == np.float16 and scales.shape == (4, 64)
  assert qzeros.dtype == np.int32 and qzeros.shape == (4, 64 * 4 // 32)
  np.testing.assert_array_equal(g_idx, np.arange(128) // 32)
  codes = np.asarray(quant.unpack(qt["codes"], 4, 128))
  for col in (0, 17, 63):
    np.testing.assert_array_equal(qweight[:, col], autogptq_pack(codes[:, col], 4))
  zero = np.round(-np.asarray(qt["offset"], np.float32) / np.asarray(qt["scale"], np.float32))
  for g in range(4):
    np.testing.assert_array_equal(qzeros[g], autogptq_pack((zero[g] - 1) % 16, 4))
  # AutoGPTQ's dequantization: scales * (q - (stored zero + 1)), groups by g_idx
  stored = gptq_export.unpack_words(qzeros, 4, 64, axis=1).astype(np.float32) + 1
  w = scales.astype(np.float32)[g_idx] * (codes - stored[g_idx])
  np.testing.assert_allclose(w, np.asarray(qt.dequantize()), rtol=0, atol=2e-3 * np.abs(w).max())
  assert "model.embed_tokens.weight" in t and "model.layers.0.input_layernorm.weight" in t


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 32), (4, 64), (8, -1)])
def test_integer_zero_round_trip_is_bit_identical(tiny, tmp_path, bits, group_size):
  frozen = integer_zero_model(tiny.params, bits, group_size)
  out = gptq_export.export_gptq(frozen, tmp_path / "ckpt")
  params, config = gptq_export.import_gptq(out)
  assert config["bits"] == bits and config["group_size"] == group_size
  assert_same_tree(params, frozen)
  expected = dict(models.llama.flatten(frozen))
  for path, leaf in models.llama.flatten(params):
    if isinstance(leaf, quant.QTensor):
      np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(expected[path].dequantize()))


def merged_like(frozen, seed=0):
  """Offsets moved by fractions of a step, as a QA-LoRA merge does (beta' = beta + s (A B))."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

  def shift(leaf):
    if not isinstance(leaf, quant.QTensor):
      return leaf
    step = leaf["scale"].astype(jnp.float32)
    delta = step * jax.random.uniform(next(keys), step.shape, minval=-0.7, maxval=0.7)
    return quant.QTensor({**leaf.arrays, "offset": (leaf["offset"] + delta).astype(leaf["offset"].dtype)}, leaf.meta)

  return jax.tree.map(shift, frozen, is_leaf=lambda x: isinstance(x, quant.QTensor))


def test_float_zeros_round_trip_is_bit_identical(tiny, tmp_path):
  merged = merged_like(integer_zero_model(tiny.params, 3, 32))
  with pytest.raises(ValueError, match="zeros='int'.*not -scale.*allowed: zeros='float'.*zeros='round'"):
    gptq_export.export_gptq(merged, tmp_path / "a")
  out = gptq_export.export_gptq(merged, tmp_path / "b", zeros="float")
  assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_float_zeros"
  t = load_file(str(out / "model.safetensors"))
  assert t["model.layers.0.self_attn.q_proj.qzeros_float"].dtype == np.float32
  assert "model.layers.0.self_attn.q_proj.qzeros" not in t
  params, _ = gptq_export.import_gptq(out)
  assert_same_tree(params, merged)


def test_rounded_zeros_export_and_their_cost(tiny, tmp_path):
  merged = merged_like(integer_zero_model(tiny.params, 4, 32))
  out = gptq_export.export_gptq(merged, tmp_path / "r", zeros="round")
  params, _ = gptq_export.import_gptq(out)
  assert_same_tree(params, gptq_export.round_zeros(merged))
  ids = np.random.default_rng(0).integers(0, 256, size=128)
  cost = gptq_export.rounding_cost(tiny, merged, ids, window=64)
  assert set(cost) == {"ppl", "rounded_ppl", "delta"}
  assert cost["delta"] == pytest.approx(cost["rounded_ppl"] - cost["ppl"])
  assert cost["rounded_ppl"] == pytest.approx(models.perplexity(tiny, ids, window=64, params=params), rel=1e-6)


def test_bad_input(tiny, tmp_path):
  frozen = integer_zero_model(tiny.params, 4, 32)
  with pytest.raises(ValueError, match="zeros='half' is not supported; allowed: int, float, round"):
    gptq_export.export_gptq(frozen, tmp_path / "x", zeros="half")
  with pytest.raises(ValueError, match="float kernel"):
    gptq_export.export_gptq(tiny.params, tmp_path / "y")
  f32, _ = models.quantize_params(tiny.params, quant.get("gptq", bits=4, group_size=32, scale_dtype="float32"))
  with pytest.raises(ValueError, match="allowed: float16"):
    gptq_export.export_gptq(f32, tmp_path / "z")
  out = gptq_export.export_gptq(frozen, tmp_path / "ok")
  with pytest.raises(FileExistsError):
    gptq_export.export_gptq(frozen, out)
  # act-order without static groups: g_idx not contiguous
  t = load_file(str(out / "model.safetensors"))
  t["model.layers.0.self_attn.q_proj.g_idx"] = t["model.layers.0.self_attn.q_proj.g_idx"][::-1].copy()
  save_file(t, str(out / "model.safetensors"))
  with pytest.raises(ValueError, match="g_idx: groups are not contiguous.*allowed: g_idx\\[r\\] = r // group_size"):
    gptq_export.import_gptq(out)
