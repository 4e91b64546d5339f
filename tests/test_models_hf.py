"""Parity with transformers on tiny random LLaMA, LLaMA-3 (scaled RoPE), Qwen2 (q/k/v biases, tied
embeddings) and Mistral (sliding window) models saved as safetensors; loader errors."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models_testing import hf_model, tiny_bpe, torch_logits  # noqa: E402
from qalora_jax import models, tree_paths  # noqa: E402

KINDS = ["llama", "llama3", "qwen2", "mistral"]


def _tokens(batch=2, seq=24, vocab=320, seed=0):
  return np.random.default_rng(seed).integers(3, vocab, (batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{kind: (directory, torch model)}, each saved with save_pretrained (safetensors)."""
  out = {}
  for kind in KINDS:
    model = hf_model(kind)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    out[kind] = (path, model)
  return out


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(saved, kind):
  path, model = saved[kind]
  lm = models.load(path)
  assert lm.config.arch == ("llama" if kind == "llama3" else kind)
  tokens = _tokens()
  ours = np.asarray(lm(jnp.asarray(tokens)))
  theirs = torch_logits(model, tokens)
  assert ours.shape == theirs.shape == (2, 24, 320)
  assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


def test_config_fields(saved):
  assert models.load(saved["qwen2"][0]).config.qkv_bias
  assert models.load(saved["qwen2"][0]).config.tie_embeddings
  assert "lm_head" not in models.load(saved["qwen2"][0]).params
  assert models.load(saved["mistral"][0]).config.sliding_window == 6
  assert models.load(saved["llama3"][0]).config.rope_scaling.factor == 8.0


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_generation_matches_transformers(saved, kind):
  path, model = saved[kind]
  lm = models.load(path).replace(config=models.load(path).config.replace(eos_ids=()))
  prompts = [list(_tokens(1, 5, seed=1)[0]), list(_tokens(1, 9, seed=2)[0])]  # different lengths: padding
  ours = models.generate_tokens(lm, prompts, max_new_tokens=12)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


def test_sharded_checkpoint(tmp_path):
  model = hf_model("llama", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  tokens = _tokens(seed=4)
  ours = np.asarray(models.load(tmp_path)(jnp.asarray(tokens)))
  assert np.abs(ours - torch_logits(model, tokens)).max() <= 1e-4


def test_unrolled_layout_and_bfloat16(saved):
  path, model = saved["llama"]
  tokens = _tokens()
  theirs = torch_logits(model, tokens)
  unrolled = models.load(path, scan_layers=False)
  assert sorted(unrolled.params["blocks"]) == ["0", "1"]
  assert np.abs(np.asarray(unrolled(jnp.asarray(tokens))) - theirs).max() <= 1e-4
  bf16 = models.load(path, dtype="bfloat16")
  diff = np.abs(np.asarray(bf16(jnp.asarray(tokens))) - theirs)
  assert diff.max() <= 0.05 * np.abs(theirs).max()


def test_tokenizer_json(tmp_path):
  model = hf_model("llama", seed=5)
  model.save_pretrained(tmp_path)
  tok = tiny_bpe()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
  lm = models.load(tmp_path)
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
  for text in ["To be, or not to be", "  spaces\tand 1234 digits", "héllo wörld ☃"]:
    assert lm.tokenizer.encode(text) == ref.encode(text, add_special_tokens=True)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text)) == text
  assert lm.tokenizer.eos_ids == (2,)
  assert len(models.generate(lm, ["To be"], max_new_tokens=4)) == 1


def _edit_safetensors(path, edit):
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  hf_model("llama", seed=6).save_pretrained(tmp_path)

  def drop(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.7.extra.weight"] = np.zeros(3, np.float32)

  _edit_safetensors(tmp_path, drop)
  with pytest.raises(models.CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight;"
                                                   r" unexpected tensors \(1\): model\.layers\.7\.extra\.weight"):
    models.load(tmp_path)


def test_mismatched_shapes_are_named(tmp_path):
  hf_model("llama", seed=7).save_pretrained(tmp_path)
  _edit_safetensors(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64),
                                                                                                      np.float32)}))
  with pytest.raises(models.CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight \[16, 64\] "
                                                   r"\(expected \[32, 64\]\)"):
    models.load(tmp_path)


def test_unknown_architecture(tmp_path):
  model = hf_model("llama", seed=8)
  model.save_pretrained(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["model_type"] = "gpt_neox"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"model_type='gpt_neox' is not supported; allowed: llama, mistral, qwen2"):
    models.load(tmp_path)


def test_unsupported_rope_type():
  with pytest.raises(ValueError, match=r"rope_type='yarn' is not supported; allowed: default, llama3"):
    models.hf.config_from_json({"model_type": "llama", "rope_parameters": {"rope_type": "yarn"},
                                "num_attention_heads": 4})


def test_param_layout(saved):
  lm = models.load(saved["llama"][0])
  assert lm.params["blocks"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
  assert lm.params["blocks"]["attn"]["k_proj"]["kernel"].shape == (2, 64, 32)
  assert lm.params["blocks"]["mlp"]["down_proj"]["kernel"].shape == (2, 128, 64)
  assert lm.params["lm_head"]["kernel"].shape == (64, 320)
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(lm.params)) == lm.config.num_params()
  qwen = models.load(saved["qwen2"][0])
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(qwen.params)) == qwen.config.num_params()
  assert set(models.param_paths(lm.params)) == {
      p for p, _ in tree_paths.flatten(models.param_shapes(lm.config), is_leaf=lambda s: isinstance(s, tuple))}
