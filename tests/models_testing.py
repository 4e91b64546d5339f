"""Helpers for the model tests: tiny random Hugging Face models, a tiny BPE tokenizer, GGUF files written from
them, the equations of a jaxpr. Nothing here downloads anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them. 1601, 1602 and 1603.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_bpe(vocab_size: int = 320):
  """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) trained on a few lines; ids 0-2 are special."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def hf_config(kind: str, vocab_size: int = 320, **overrides):
  """A tiny transformers config of `kind` ("llama", "llama3", "qwen2", "mistral")."""
  import transformers

  common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, initializer_range=0.1)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
  elif kind == "llama3":
    cfg = transformers.LlamaConfig(**common, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
  elif kind == "mistral":
    cfg = transformers.MistralConfig(**common, sliding_window=6, head_dim=16)
  else:
    raise ValueError(kind)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def hf_model(kind: str, seed: int = 0, **overrides):
  """A tiny random transformers causal LM in float32 with eager attention; biases (Qwen2) are random too."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = hf_config(kind, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def torch_logits(model, tokens) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's converter's q/k row order: within each head, rows (j, j + d/2) become (2j, 2j + 1)."""
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokenizer=None, types: dict[str, str] | None = None, arch: str | None = None,
               pre: str = "gpt2", skip: tuple[str, ...] = ()) -> None:
  """Writes a transformers LLaMA/Qwen2 model as llama.cpp would (q/k rows permuted for LLaMA).

  `types` maps a substring of the GGUF tensor name to a GGML type name (default F32); the model's weights
  are replaced in place by their quantize-dequantize round trip, so the torch model stays the exact reference.
  """
  import gguf
  import torch

  cfg = model.config
  arch = arch or ("qwen2" if cfg.model_type == "qwen2" else "llama")
  types = types or {}
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if tokenizer is not None:
    import json

    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
      tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
  state = dict(model.state_dict())
  if cfg.tie_word_embeddings:
    state.pop("lm_head.weight", None)
  for name, tensor in state.items():
    if name in names:
      gname = names[name]
    else:
      layer, rest = name.removeprefix("model.layers.").split(".", 1)
      key = next(k for k in per_layer if rest.startswith(k))
      gname = f"blk.{layer}.{per_layer[key]}{rest[len(key):]}"
    if gname in skip:
      continue
    w = tensor.float().numpy()
    if arch == "llama" and ".attn_q." in gname:
      w = llama_cpp_permute(w, cfg.num_attention_heads)
    if arch == "llama" and ".attn_k." in gname:
      w = llama_cpp_permute(w, cfg.num_key_value_heads)
    qtype = gguf.GGMLQuantizationType[next((t for s, t in types.items() if s in gname), "F32")]
    if w.ndim == 1:
      qtype = gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F32:
      data = w.astype(np.float32)
    elif qtype == gguf.GGMLQuantizationType.F16:
      data = w.astype(np.float16)
    else:
      try:
        data = gguf.quants.quantize(w.astype(np.float32), qtype)
      except NotImplementedError:  # a type gguf-py cannot write: zero bytes of the right size
        writer.add_tensor(gname, np.zeros(gguf.quant_shape_to_byte_shape(w.shape, qtype), np.uint8), raw_dtype=qtype)
        continue
    writer.add_tensor(gname, data, raw_dtype=qtype)
    # What the file now holds, back in the reference model (un-permuted again for LLaMA q/k).
    back = np.asarray(gguf.quants.dequantize(data, qtype), np.float32).reshape(w.shape)
    if arch == "llama" and ".attn_q." in gname:
      back = _unpermute(back, cfg.num_attention_heads)
    if arch == "llama" and ".attn_k." in gname:
      back = _unpermute(back, cfg.num_key_value_heads)
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(back))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _unpermute(w, n_heads):
  # The inverse of llama_cpp_permute, written out independently of the library's version.
  out = np.empty_like(w)
  d = w.shape[0] // n_heads
  for h in range(n_heads):
    for j in range(d // 2):
      out[h * d + j] = w[h * d + 2 * j]
      out[h * d + j + d // 2] = w[h * d + 2 * j + 1]
  return out


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (scan, checkpoint, custom_vjp and pjit bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)
