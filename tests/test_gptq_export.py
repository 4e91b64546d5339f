"""GPTQ-layout checkpoints: AutoGPTQ v1 packing on hand-made examples, export -> import round trips (integer
and float zeros), rounding of merged offsets, and bad input; `qalora export --format gptq` on a trained QA-LoRA
run, its files dequantized by hand against the merged model, and its refusals."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qalora_jax import cli, models, quant, tree_paths
from qalora_jax.export import gptq as gptq_export
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment

TINY = "configs/tiny.py"
LINEAR_NAMES = {"attn/q_proj": "self_attn.q_proj", "attn/k_proj": "self_attn.k_proj",
                "attn/v_proj": "self_attn.v_proj", "attn/o_proj": "self_attn.o_proj", "mlp/gate_proj": "mlp.gate_proj",
                "mlp/up_proj": "mlp.up_proj", "mlp/down_proj": "mlp.down_proj"}


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
  return models.tiny_model()


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
  expected = dict(tree_paths.flatten(frozen))
  for path, leaf in tree_paths.flatten(params):
    if isinstance(leaf, quant.QTensor):
      np.testing.assert_array_equal(np.asarray(leaf.dequantize()), np.asarray(expected[path].dequantize()))


def test_biases_and_an_untied_head_round_trip(tiny, tmp_path):
  config = tiny.config.replace(qkv_bias=True, tie_embeddings=False)
  params = models.llama.init_params(config, jax.random.PRNGKey(1))
  frozen = integer_zero_model(params, 4, 32)
  params_back, _ = gptq_export.import_gptq(gptq_export.export_gptq(frozen, tmp_path / "ckpt"))
  assert_same_tree(params_back, frozen)
  t = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
  assert t["model.layers.1.self_attn.k_proj.bias"].shape == (config.kv_size,)
  np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(frozen["lm_head"]["kernel"]).T)  # torch's [out, in]


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


def test_a_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
  frozen = integer_zero_model(tiny.params, 4, 32)

  def failing_save(tensors, path, metadata=None):
    Path(path).write_bytes(b"half a file")
    raise OSError("disk full")

  monkeypatch.setattr(gptq_export, "save_file", failing_save)
  with pytest.raises(OSError, match="disk full"):
    gptq_export.export_gptq(frozen, tmp_path / "out")
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ command line


def unpack_by_hand(words, bits, axis):
  """The k-bit values of int32 words along `axis` (bits dividing 32): value j of a word sits at bits
  [bits * j, bits * (j + 1)), as AutoGPTQ v1 packs qweight (along `in`) and qzeros (along `out`)."""
  w = np.moveaxis(np.asarray(words), axis, 0).view(np.uint32).astype(np.int64)
  per = 32 // bits
  values = np.stack([(w >> (bits * j)) & (2**bits - 1) for j in range(per)], axis=1)
  return np.moveaxis(values.reshape((w.shape[0] * per,) + w.shape[1:]), 0, axis)


def gptq_dequantize(t, prefix, bits):
  """w [in, out] as a GPTQ reader computes it: w = scales[g] * (q - zero[g]) with g = g_idx[r], zero the float32
  qzeros_float or the packed qzeros + 1 (v1 stores zero - 1, modulo 2^k), in float64."""
  q = unpack_by_hand(t[f"{prefix}.qweight"], bits, axis=0)
  if f"{prefix}.qzeros_float" in t:
    zero = t[f"{prefix}.qzeros_float"].astype(np.float64)
  else:
    zero = (unpack_by_hand(t[f"{prefix}.qzeros"], bits, axis=1) + 1) % 2**bits
  g = t[f"{prefix}.g_idx"]
  return t[f"{prefix}.scales"].astype(np.float64)[g] * (q - zero[g])


def block_linears(params):
  """{(layer, HF module name): dequantized float32 [in, out]} of a parameter tree's block linears."""
  stacked = dict(tree_paths.flatten(models.llama.stack_blocks(params)))
  out = {}
  for module, name in LINEAR_NAMES.items():
    w = np.asarray(stacked[f"blocks/{module}/kernel"].dequantize())
    out.update({(i, name): w[i] for i in range(w.shape[0])})
  return out


def _run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope="module")
def qalora_run(tmp_path_factory):
  """A tiny QA-LoRA run (INT4 g16 base, 2 steps) and its merged model's block linears, dequantized."""
  run = tmp_path_factory.mktemp("gptq_cli") / "run"
  assert cli.main(["train", "--config", TINY, "--workdir", str(run), "--config.steps=2"]) == 0
  r, trainable, _ = experiment.restore(run, log=lambda m: None)
  return run, block_linears(r.merged(trainable))


def test_cli_float_zeros_are_the_merged_model(qalora_run, tmp_path, capsys):
  run, merged = qalora_run
  code, out, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--zeros", "float", "--out",
                         str(tmp_path / "a")], capsys)
  assert code == 0, err
  report = json.loads(out)
  assert report == {"out": str(tmp_path / "a"), "format": "gptq", "zeros": "float", "bits": 4, "group_size": 16,
                    "checkpoint_format": "gptq_float_zeros", "step": 2, "rounding_cost": None}
  t = load_file(str(tmp_path / "a" / "model.safetensors"))
  for (i, name), w in merged.items():
    np.testing.assert_allclose(gptq_dequantize(t, f"model.layers.{i}.{name}", 4), w, rtol=0,
                               atol=1e-6 * np.abs(w).max())
  # The same model saved by `qalora merge` and exported with --model: the same file.
  assert _run(["merge", "--workdir", str(run), "--out", str(tmp_path / "merged")], capsys)[0] == 0
  code, out, err = _run(["export", "--model", str(tmp_path / "merged"), "--format", "gptq", "--zeros", "float",
                         "--out", str(tmp_path / "b")], capsys)
  assert code == 0, err
  assert json.loads(out) == {**report, "out": str(tmp_path / "b")}
  assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cli_rounded_zeros_move_weights_by_the_reported_cost(qalora_run, tmp_path, capsys):
  run, merged = qalora_run
  code, out, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--zeros", "round", "--out",
                         str(tmp_path / "r")], capsys)
  assert code == 0, err
  report = json.loads(out)
  assert report["checkpoint_format"] == "gptq" and report["zeros"] == "round"
  cost = report["rounding_cost"]
  result = json.loads((run / "result.json").read_text())
  assert cost["ppl"] == pytest.approx(result["merged_ppl"], rel=1e-5)  # the run's held-out tokens
  assert cost["delta"] == pytest.approx(cost["rounded_ppl"] - cost["ppl"])
  t = load_file(str(tmp_path / "r" / "model.safetensors"))
  assert not any(k.endswith("qzeros_float") for k in t)
  worst = max(np.abs(gptq_dequantize(t, f"model.layers.{i}.{name}", 4) - w).max() for (i, name), w in merged.items())
  assert 0 < worst <= cost["max_abs_dw"] * (1 + 1e-5)
  assert worst >= cost["max_abs_dw"] * (1 - 1e-5)  # the reported change is the largest one, not a loose bound


def test_cli_integer_zeros_and_an_existing_output_are_refused(qalora_run, tmp_path, capsys):
  run, _ = qalora_run
  code, _, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--out", str(tmp_path / "x")], capsys)
  assert code == 2 and err.count("\n") == 1
  assert "zeros='int': " in err and "allowed: zeros='float' (float32 qzeros_float) or zeros='round'" in err
  assert os.listdir(tmp_path) == []  # refused before anything was written
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "keep").write_text("keep me")
  code, _, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--zeros", "float", "--out",
                       str(tmp_path / "x")], capsys)
  assert code == 2 and err.count("\n") == 1 and "x exists; choose another output path or allow overwriting" in err
  assert os.listdir(tmp_path / "x") == ["keep"]
  code, _, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--zeros", "float", "--out",
                       str(tmp_path / "x"), "--overwrite"], capsys)
  assert code == 0, err
  assert sorted(os.listdir(tmp_path / "x")) == ["config.json", "model.safetensors", "quantize_config.json"]
  assert os.listdir(tmp_path) == ["x"]


def test_cli_model_requantized_with_gptq_has_exact_integer_zeros(tmp_path, capsys):
  lm = models.tiny_model()
  models.save(lm, tmp_path / "float")
  code, _, err = _run(["export", "--model", str(tmp_path / "float"), "--format", "gptq", "--out",
                       str(tmp_path / "x")], capsys)
  assert code == 2 and err.count("\n") == 1 and "is a float kernel; GPTQ export needs every block linear" in err
  code, out, err = _run(["export", "--model", str(tmp_path / "float"), "--format", "gptq", "--requantize",
                         "gptq:bits=4,group_size=32", "--out", str(tmp_path / "q")], capsys)
  assert code == 0, err
  assert json.loads(out)["rounding_cost"] is None and json.loads(out)["group_size"] == 32
  quantized, _ = models.quantize_params(lm.params, [(models.BLOCK_LINEARS, quant.get("gptq", bits=4, group_size=32))])
  t = load_file(str(tmp_path / "q" / "model.safetensors"))
  offsets = dict(tree_paths.flatten(models.llama.stack_blocks(quantized)))
  for (i, name), w in block_linears(quantized).items():
    # Our tree holds offset = -scale * zero rounded to float16, a GPTQ reader scale * zero itself: they differ by
    # at most half a float16 step of the offset.
    module = next(m for m, n in LINEAR_NAMES.items() if n == name)
    offset = np.abs(np.asarray(offsets[f"blocks/{module}/kernel"]["offset"][i], np.float32)).max()
    np.testing.assert_allclose(gptq_dequantize(t, f"model.layers.{i}.{name}", 4), w, rtol=0,
                               atol=offset * 2**-11 + 1e-6 * np.abs(w).max())


def _workdir(tmp_path, spec, overrides=()):
  """A run directory holding only config.json: the refusals read it before anything is restored."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(config_lib.load(spec, list(overrides)).to_json_best_effort())
  return run


@pytest.mark.parametrize("spec, overrides, argv, message", [
    (f"{TINY}:method=lora", [], [],
     ("config.adapter.method='lora' with config.base.quantizer='none' merges into float weights, which the GPTQ "
      "layout cannot hold; allowed: a QA-LoRA run on an INT-k base (int, int-mse, gptq) or --requantize NAME:k=v")),
    (f"{TINY}:method=qlora", [], [],
     "config.adapter.method='lora' with config.base.quantizer='nf4' merges into float weights"),
    (f"{TINY}:method=qlora", [], ["--requantize", "nf4:block_size=32"],
     ("--requantize nf4:block_size=32: nf4 with options {'block_size': 32, 'double_quant': False} makes nf4 "
      "tensors, which the GPTQ layout cannot hold; allowed: an asymmetric INT-k quantizer")),
    (f"{TINY}:method=lora", [], ["--requantize", "int:bits=5,group_size=32"],
     "--requantize int:bits=5,group_size=32: bits=5 is not supported by the GPTQ layout; allowed: 2, 3, 4, 8"),
    (TINY, [], ["--requantize", "int:bits=4"],
     ("a QA-LoRA run merges exactly into its INT-k base, there is nothing to re-quantize; allowed: no "
      "--requantize")),
    (TINY, [], ["--requantize", "int:bits=4", "--format", "gguf"],  # the GGUF export refuses it too
     ("a QA-LoRA run merges exactly into its INT-k base, there is nothing to re-quantize; allowed: no "
      "--requantize")),
    (TINY, ["--config.base.options.scale_dtype=float32"], [],
     "config.base.quantizer='int': scale dtype float32 is not supported by the GPTQ layout; allowed: float16"),
    (TINY, [], ["--merged", "float"],
     "--merged float gives float weights, which the GPTQ layout cannot hold; allowed: --merged exact"),
    (TINY, [], ["--zeros", "half"], "--zeros 'half' is not supported; allowed: int, float, round"),
])
def test_cli_refusals_come_before_anything_is_loaded(tmp_path, capsys, spec, overrides, argv, message):
  run = _workdir(tmp_path, spec, overrides)
  code, _, err = _run(["export", "--workdir", str(run), "--format", "gptq", "--out", str(tmp_path / "out"), *argv],
                      capsys)
  assert code == 2 and err.count("\n") == 1
  assert message in err
  assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == ["config.json"]  # nothing written
