"""The GGUF loader on small files written here from tiny random transformers models: every supported tensor
type, llama.cpp's q/k permutation, the tokenizer from metadata, and the errors."""

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models_testing import CORPUS, hf_model, tiny_bpe, torch_logits, write_gguf  # noqa: E402
from qalora_jax import models, quant  # noqa: E402
from qalora_jax.models import gguf as gguf_loader  # noqa: E402

TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16", "ffn_gate": "BF16",
         "ffn_up": "Q5_0", "ffn_down": "Q5_1", "token_embd": "Q8_0", "output.weight": "F16"}


def _tokens(batch=2, seq=20, seed=0):
  return np.random.default_rng(seed).integers(3, 320, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_match_the_written_model(tmp_path, kind):
  model = hf_model(kind, seed=1)
  path = tmp_path / "tiny.gguf"
  write_gguf(path, model, tiny_bpe(), types=TYPES)
  kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
  assert {"Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "Q5_0", "Q5_1", "F32"} <= kinds
  lm = models.load(path)
  assert lm.config.arch == kind and lm.config.qkv_bias == (kind == "qwen2")
  tokens = _tokens()
  ours = np.asarray(lm(jnp.asarray(tokens)))
  theirs = torch_logits(model, tokens)
  assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
  if kind == "llama":  # quantizing while reading (the float model never whole) = quantizing after loading
    q = quant.get("int", bits=4, group_size=16)
    streamed = models.load(path, quantize=q).params
    jax.tree.map(np.testing.assert_array_equal, streamed, models.quantize_params(lm.params, q)[0])
    with pytest.raises(ValueError, match="rule 'nothing' matches no parameter"):
      models.load(path, quantize=[("nothing", q)])


def test_unpermute_inverts_llama_cpp_order():
  from models_testing import llama_cpp_permute

  w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
  np.testing.assert_array_equal(gguf_loader.unpermute_rows(llama_cpp_permute(w, 6), 6), w)
  b = np.arange(32, dtype=np.float32)
  np.testing.assert_array_equal(gguf_loader.unpermute_rows(llama_cpp_permute(b, 4), 4), b)


def test_tokenizer_from_metadata_matches_the_trained_one(tmp_path):
  model = hf_model("llama", seed=2)
  tok = tiny_bpe()
  path = tmp_path / "tiny.gguf"
  write_gguf(path, model, tok)
  lm = models.load(path)
  texts = CORPUS[:4] + ["  two  spaces\n\nand\ttabs 12345", "unicode: héllo — ☃ 日本",
                        "<|im_start|>hi<|im_end|>"]
  for text in texts:
    assert lm.tokenizer.encode(text) == tok.encode(text).ids
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
  assert lm.tokenizer.encode("<|im_end|>") == [2]
  assert (lm.tokenizer.bos_id, lm.tokenizer.eos_ids) == (1, (2,))


def test_smollm_pre_tokenizer_isolates_digits(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path, hf_model("llama", seed=3), tiny_bpe(), pre="smollm")
  tok = models.load(path).tokenizer
  pieces = [tok.decode([i]) for i in tok.encode("year 1601, 1602")]
  assert pieces[-4:] == ["1", "6", "0", "2"] and all(len(p) == 1 for p in pieces if p.isdigit())


def test_unsupported_tensor_type_is_named(tmp_path):
  path = tmp_path / "odd.gguf"
  write_gguf(path, hf_model("llama", seed=4), types={"blk.1.ffn_up": "IQ4_NL"})
  with pytest.raises(ValueError, match=r"GGUF tensor blk\.1\.ffn_up\.weight has type IQ4_NL, which is not "
                                       r"supported; allowed: F32, F16, BF16"):
    models.load(path)


def test_unknown_architecture_is_named(tmp_path):
  path = tmp_path / "arch.gguf"
  write_gguf(path, hf_model("llama", seed=5), arch="gpt2")
  with pytest.raises(ValueError, match=r"general\.architecture='gpt2' is not supported; allowed: llama, qwen2"):
    models.load(path)


def test_missing_tensors_are_named(tmp_path):
  path = tmp_path / "short.gguf"
  write_gguf(path, hf_model("llama", seed=6), skip=("blk.1.attn_v.weight", "output_norm.weight"))
  with pytest.raises(models.CheckpointError,
                     match=r"missing tensors \(2\): blk\.1\.attn_v\.weight, output_norm\.weight"):
    models.load(path)


def test_linear_kernels_lists_every_block_linear(tmp_path):
  path = tmp_path / "tiny.gguf"
  write_gguf(path, hf_model("llama", seed=7))
  kernels = dict(gguf_loader.linear_kernels(path))
  assert len(kernels) == 2 * 7
  assert kernels["blk.0.ffn_down.weight"].shape == (128, 64)


def test_bos_is_added_when_the_metadata_asks():
  import json

  from qalora_jax.models.tokenizer import from_gguf_metadata

  spec = json.loads(tiny_bpe().to_str())
  tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": [" ".join(m) if not isinstance(m, str) else m for m in spec["model"]["merges"]],
          "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3), "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
  tok = from_gguf_metadata(meta)
  assert tok.encode("To be")[0] == 1 and tok.encode("To be")[1:] == from_gguf_metadata(
      {**meta, "tokenizer.ggml.add_bos_token": False}).encode("To be")
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='mystery' is not supported; allowed: default, gpt-2"):
    from_gguf_metadata({**meta, "tokenizer.ggml.pre": "mystery"})
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='llama' is not supported; allowed: gpt2"):
    from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})
