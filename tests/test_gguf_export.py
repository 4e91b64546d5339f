"""GGUF export: block encodings against the gguf package's own dequantizers and a hand-derived nibble order,
round trips through our loader (QTensors bit for bit) and transformers' GGUF loader (logits), the
train -> merge -> generate -> eval -> export walk on the command line, and the refusals."""

import json

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models_testing import CORPUS, hf_model, llama_cpp_permute, tiny_bpe, torch_logits, write_gguf  # noqa: E402
from qalora_jax import cli, models, nn, quant, tree_paths  # noqa: E402
from qalora_jax.export import gguf as gguf_export  # noqa: E402
from qalora_jax.models import gguf as gguf_io  # noqa: E402

T = gguf.GGMLQuantizationType
TINY = "configs/tiny.py"


def _assert_same_params(a: dict, b: dict) -> int:
  """Every leaf equal bit for bit (QTensors: meta and arrays); returns the number of QTensors."""
  a, b = dict(tree_paths.flatten(a)), dict(tree_paths.flatten(b))
  assert sorted(a) == sorted(b)
  for path, x in a.items():
    if isinstance(x, quant.QTensor):
      _assert_same_qtensor(x, b[path])
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(b[path]))
  return sum(isinstance(x, quant.QTensor) for x in a.values())


def _qtensor(setting, shape=(96, 24), seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), shape) * 0.05
  return quant.get("int", **setting).quantize(w)


def _assert_same_qtensor(a, b):
  assert a.meta == b.meta
  assert sorted(a.arrays) == sorted(b.arrays)
  for k in a.arrays:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize("setting, qtype", [
    (dict(bits=4, group_size=32), T.Q4_1),
    (dict(bits=4, group_size=64), T.Q4_1),    # 96 inputs: a full group of 64 and a shorter last one of 32
    (dict(bits=3, group_size=96), T.Q4_1),
    (dict(bits=2, group_size=-1), T.Q4_1),
    (dict(bits=4, group_size=32, symmetric=True), T.Q4_0),
    (dict(bits=3, group_size=64, symmetric=True), T.Q4_0),
    (dict(bits=8, group_size=32, symmetric=True), T.Q8_0),
    (dict(bits=6, group_size=64, symmetric=True), T.Q8_0),
])
def test_blocks_dequantize_as_the_qtensor_and_read_back_bit_for_bit(setting, qtype):
  qt = _qtensor(setting)
  # Merged QA-LoRA offsets are arbitrary float16 values, not min-max ones.
  if "offset" in qt.arrays:
    delta = 0.01 * jax.random.normal(jax.random.PRNGKey(1), qt["offset"].shape)
    qt = quant.QTensor({**qt.arrays, "offset": (qt["offset"] + delta).astype(jnp.float16)}, qt.meta)
  got_type, data, dw = gguf_export.qtensor_blocks(qt)
  assert got_type == qtype and dw == 0.0
  want = np.asarray(qt.dequantize()).T  # [out, in]
  np.testing.assert_allclose(np.asarray(gguf.quants.dequantize(data, qtype)), want, rtol=0, atol=1e-7)
  back = gguf_io.qtensor_from_blocks(qtype, data, qt.bits, qt.group_size, bool(qt.meta.option("symmetric")))
  _assert_same_qtensor(back, qt)
  # q/k rows in llama.cpp's rotary order: the reference permutation of the dequantized rows.
  _, permuted, _ = gguf_export.qtensor_blocks(qt, n_heads=3)
  np.testing.assert_allclose(np.asarray(gguf.quants.dequantize(permuted, qtype)), llama_cpp_permute(want, 3),
                             rtol=0, atol=1e-7)


def test_q4_1_nibble_order_by_hand():
  codes = np.array([[j % 16 if j < 16 else 15 - j % 16 for j in range(32)]], np.uint8)
  d, m = np.array([[0.5]], np.float16), np.array([[-1.0]], np.float16)
  data = gguf_io.encode_blocks(T.Q4_1, codes, d, m)
  assert data.shape == (1, 20)
  assert data[0, :2].tobytes() == np.float16(0.5).tobytes() and data[0, 2:4].tobytes() == np.float16(-1).tobytes()
  # byte j: element j in the low nibble, element j + 16 in the high nibble
  assert list(data[0, 4:]) == [j | (15 - j) << 4 for j in range(16)]
  np.testing.assert_array_equal(gguf.quants.dequantize(data, T.Q4_1)[0], 0.5 * codes[0] - 1.0)


@pytest.mark.parametrize("qt, message", [
    (quant.get("nf4", block_size=64).quantize(jnp.ones((64, 8))),
     r"format='nf4' \(bits=4, group_size=64\) is a non-uniform codebook, which no GGUF type stores exactly; "
     r"nearest exportable: int with bits=4, group_size=64 \(Q4_1\)"),
    (_qtensor(dict(bits=4, group_size=16)),
     r"group_size=16 is not exportable: GGUF blocks hold 32 weights; allowed: a multiple of 32 \(nearest: "
     r"group_size=32\)"),
    (_qtensor(dict(bits=8, group_size=32)),
     r"bits=8 with symmetric=False is not exportable: no GGUF block stores a 8-bit code with an offset; nearest "
     r"exportable: bits=4 \(Q4_1\) or symmetric=True \(Q8_0\)"),
    (_qtensor(dict(bits=4, group_size=32), shape=(48, 8)), r"input size 48 is not exportable"),
])
def test_settings_without_an_exact_type_are_refused(qt, message):
  with pytest.raises(ValueError, match=message):
    gguf_export.qtensor_blocks(qt, where="blocks/attn/q_proj/kernel")


def test_float32_scales_are_refused_with_the_change_or_written_when_allowed():
  qt = _qtensor(dict(bits=4, group_size=32, scale_dtype="float32"))
  with pytest.raises(ValueError, match=r"scale_dtype=float32 is not exportable exactly: .* max \|dw\| = [0-9.e-]+; "
                                       r"allowed: scale_dtype=float16 \(nearest exportable\)"):
    gguf_export.qtensor_blocks(qt)
  qtype, data, dw = gguf_export.qtensor_blocks(qt, allow_rounding=True)
  written = np.asarray(gguf.quants.dequantize(data, qtype), np.float64)
  assert dw > 0 and dw == pytest.approx(np.abs(written - np.asarray(qt.dequantize(), np.float64).T).max(), rel=1e-6)
  # float32 values that float16 holds exactly need no rounding
  exact = quant.QTensor({k: (v.astype(jnp.float16).astype(jnp.float32) if k != "codes" else v)
                         for k, v in qt.arrays.items()}, qt.meta)
  assert gguf_export.qtensor_blocks(exact)[2] == 0.0


def _merged(lm, setting, seed=0):
  """lm's block linears quantized with `setting` and QA-LoRA adapters with random B merged into the offsets."""
  frozen, _ = models.quantize_params(lm.params, quant.get("int", **setting))
  adapters = nn.add_adapters(frozen, "qalora", rank=1, alpha=2.0, key=jax.random.PRNGKey(seed))
  adapters = jax.tree.map(lambda a: a.__class__(a.a, 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), a.b.shape),
                                                a.meta), adapters, is_leaf=lambda x: isinstance(x, nn.Adapter))
  return nn.merge_params(frozen, adapters)


def _check_round_trip(path, lm, merged, model=None):
  """Our loader reads `path` back to `merged` bit for bit; transformers' logits equal ours on it."""
  back = models.load(path, keep_quantized=True)
  assert _assert_same_params(merged, back.params) == 7
  theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  tokens = np.random.default_rng(0).integers(3, lm.config.vocab_size, (2, 24)).astype(np.int32)
  ours = np.asarray(lm.apply(merged, jnp.asarray(tokens)))
  want = torch_logits(theirs.eval(), tokens)
  assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()
  return back


def test_round_trip_from_a_gguf_source(tmp_path):
  """Metadata and tokenizer carried over from the source file; INT4 g64 (two groups over 128 inputs)."""
  src = tmp_path / "src.gguf"
  write_gguf(src, hf_model("llama", seed=1), tiny_bpe())
  lm = models.load(src)
  merged = _merged(lm, dict(bits=4, group_size=64))
  out = tmp_path / "out.gguf"
  report = gguf_export.export_gguf(out, lm.config, merged, lm.tokenizer, source=src)
  assert report["types"] == {"Q4_1": 14, "F32": 7} and report["max_abs_dw"] == 0  # untied head: F32 as in the source
  back = _check_round_trip(out, lm, merged)
  old, new = gguf_io.read_metadata(gguf.GGUFReader(str(src))), gguf_io.read_metadata(gguf.GGUFReader(str(out)))
  assert {k: v for k, v in new.items() if k.startswith("tokenizer.")} == \
      {k: v for k, v in old.items() if k.startswith("tokenizer.")}
  assert back.tokenizer.encode(CORPUS[2]) == lm.tokenizer.encode(CORPUS[2])
  assert out.stat().st_mode & 0o777 == src.stat().st_mode & 0o777  # as a plain open() makes it, not private


def test_round_trip_from_a_hugging_face_directory(tmp_path):
  """Qwen2 (biases, no q/k permutation), mixed symmetric types; the tokenizer described from tokenizer.json."""
  model = hf_model("qwen2", seed=2)
  model.save_pretrained(tmp_path / "hf")
  tok = tiny_bpe()
  tok.save(str(tmp_path / "hf" / "tokenizer.json"))
  lm = models.load(tmp_path / "hf")
  merged, _ = models.quantize_params(lm.params, [
      (r"blocks/attn/.*/kernel", quant.get("int", bits=4, group_size=32, symmetric=True)),
      (r"blocks/mlp/.*/kernel", quant.get("int", bits=8, group_size=64, symmetric=True))])
  out = tmp_path / "out.gguf"
  report = gguf_export.export_gguf(out, lm.config, merged, lm.tokenizer)
  assert report["types"] == {"Q4_0": 8, "Q8_0": 6, "F32": 5 + 6 + 1}  # 5 norms, 6 q/k/v biases, the (tied) embedding
  back = _check_round_trip(out, lm, merged)
  for text in CORPUS[:4] + ["<|im_start|>hi<|im_end|>", "  two  spaces\n\tand 12345"]:
    assert back.tokenizer.encode(text) == tok.encode(text).ids


def test_a_tokenizer_gguf_cannot_describe_is_refused(tmp_path):
  import tokenizers

  lm = models.load(_tiny_gguf(tmp_path))
  backend = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  backend.decoder = tokenizers.decoders.ByteLevel()
  with pytest.raises(ValueError, match=r"tokenizer pre_tokenizer Metaspace is not supported by GGUF export; "
                                       r"allowed: ByteLevel \(gpt2\)"):
    gguf_export.export_gguf(tmp_path / "x.gguf", lm.config, lm.params, models.Tokenizer(backend))
  assert not (tmp_path / "x.gguf").exists()


def _tiny_gguf(tmp_path):
  path = tmp_path / "tiny.gguf"
  if not path.exists():
    write_gguf(path, hf_model("llama", seed=3), tiny_bpe())
  return path


def test_existing_output_and_a_failed_write_leave_no_partial_file(tmp_path, monkeypatch):
  src = _tiny_gguf(tmp_path)
  lm = models.load(src, keep_quantized=True)
  out = tmp_path / "out.gguf"
  out.write_bytes(b"keep me")
  with pytest.raises(FileExistsError, match=r"out\.gguf exists; .*\(--overwrite\)"):
    gguf_export.export_gguf(out, lm.config, lm.params, source=src)
  calls = []

  def failing_padding(self, fp, n, *args, **kwargs):
    calls.append(n)
    if len(calls) == 4:  # the header and the first tensors are on disk by now
      raise OSError("disk full")
    return original(self, fp, n, *args, **kwargs)

  original = gguf.GGUFWriter.write_padding
  monkeypatch.setattr(gguf.GGUFWriter, "write_padding", failing_padding)
  with pytest.raises(OSError, match="disk full"):
    gguf_export.export_gguf(out, lm.config, lm.params, source=src, overwrite=True)
  assert len(calls) == 4
  assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tiny.gguf"]
  monkeypatch.undo()
  gguf_export.export_gguf(out, lm.config, lm.params, source=src, overwrite=True)
  # the source's own F32 tensors and nothing else
  assert {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors} == \
      {t.name: t.tensor_type for t in gguf.GGUFReader(str(src)).tensors}


def _run(argv, capsys):
  code = cli.main(argv)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
  """A tiny random LLaMA as a GGUF file with a BPE tokenizer: a model a user could fine-tune and export."""
  path = tmp_path_factory.mktemp("source") / "tiny.gguf"
  write_gguf(path, hf_model("llama", seed=4), tiny_bpe())
  return path


def test_train_merge_generate_eval_export_on_the_command_line(tmp_path, capsys, tiny_source):
  run, merged_dir = tmp_path / "run", tmp_path / "merged"
  assert _run(["train", "--config", TINY, "--workdir", str(run), "--config.steps=2",
               f"--config.model.name={tiny_source}",
               "--config.base.options.group_size=32", "--config.adapter.rank=2"], capsys)[0] == 0
  assert _run(["merge", "--workdir", str(run), "--out", str(merged_dir)], capsys)[0] == 0
  code, out, _ = _run(["generate", "--model", str(merged_dir), "--prompt", "To be", "--max-new-tokens", "4"], capsys)
  assert code == 0 and out.endswith("\n")
  by_model = json.loads(_run(["eval", "--model", str(merged_dir)], capsys)[1])
  by_run = json.loads(_run(["eval", "--workdir", str(run), "--merged"], capsys)[1])
  assert by_model == by_run  # the same held-out tokens and the same merged parameters
  for argv, name in ((["--model", str(merged_dir)], "a.gguf"), (["--workdir", str(run)], "b.gguf")):
    code, out, err = _run(["export", *argv, "--format", "gguf", "--out", str(tmp_path / name)], capsys)
    assert code == 0, err
    assert json.loads(out)["types"] == {"Q4_1": 14, "F32": 7}
  assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
  saved = models.load(merged_dir)
  back = _check_round_trip(tmp_path / "a.gguf", saved, saved.params)
  assert back.tokenizer.encode(CORPUS[0]) == saved.tokenizer.encode(CORPUS[0])

  code, _, err = _run(["export", "--model", str(merged_dir), "--format", "gguf", "--out", str(tmp_path / "a.gguf")],
                      capsys)
  assert code == 2 and "a.gguf exists; choose another output path or allow overwriting (--overwrite)" in err


def test_command_line_refusals(tmp_path, capsys, tiny_source):
  code, _, err = _run(["export", "--model", str(tiny_source), "--requantize", "int:bits=4,group_size=16",
                       "--format", "gguf", "--out", str(tmp_path / "x.gguf")], capsys)
  assert code == 2 and err.count("\n") == 1
  assert "group_size=16 is not exportable: GGUF blocks hold 32 weights; allowed: a multiple of 32 (nearest: " \
         "group_size=32)" in err
  # A QLoRA run's workdir: the refusal reads its config.json before restoring anything.
  from qalora_jax.train import config as config_lib

  lora = tmp_path / "qlora"
  lora.mkdir()
  cfg = config_lib.load(f"{TINY}:method=qlora", [])
  (lora / "config.json").write_text(cfg.to_json_best_effort())
  code, _, err = _run(["export", "--workdir", str(lora), "--format", "gguf", "--out", str(tmp_path / "x.gguf")], capsys)
  assert code == 2 and err.count("\n") == 1
  assert "lora adapters on a nf4 base do not merge exactly into INT-k weights; allowed: --merged float (float32 " \
         "weights) or --requantize NAME:k=v" in err
  assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))  # nothing written


@pytest.mark.real_model
def test_smollm2_is_written_back_byte_for_byte(smollm2_gguf, tmp_path):
  """SmolLM2's Q4_1 block linears read as QTensors and exported again: every tensor equals llama.cpp's own
  file byte for byte (q/k permutation and the Q8_0 embedding included), every metadata key carries over."""
  lm = models.load(smollm2_gguf, keep_quantized=True)
  out = tmp_path / "smollm2.gguf"
  report = gguf_export.export_gguf(out, lm.config, lm.params, lm.tokenizer, source=smollm2_gguf)
  assert report["types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61} and report["max_abs_dw"] == 0
  old, new = gguf.GGUFReader(str(smollm2_gguf)), gguf.GGUFReader(str(out))
  theirs, ours = {t.name: t for t in old.tensors}, {t.name: t for t in new.tensors}
  assert sorted(theirs) == sorted(ours)
  for name, t in theirs.items():
    assert ours[name].tensor_type == t.tensor_type, name
    np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(t.data), err_msg=name)
  old_meta, new_meta = gguf_io.read_metadata(old), gguf_io.read_metadata(new)
  assert {k: new_meta[k] for k in old_meta} == old_meta
