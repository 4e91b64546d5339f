"""Loading a Hugging Face model directory: config.json, *.safetensors (single or sharded), tokenizer.json.

    config, params, tokenizer = hf.load(directory)

Supports the LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM layouts. Weights are [out, in] in the
checkpoint and become [in, out] kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from qalora_jax.models import assemble
from qalora_jax.models.config import Config, RopeScaling
from qalora_jax.models.tokenizer import Tokenizer, from_hf_dir

MODEL_TYPES = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _tensor_names() -> dict[str, str]:
  """Parameter path -> Hugging Face tensor name ("{i}": the layer)."""
  names = {
      "embed/embedding": "model.embed_tokens.weight",
      "final_norm/scale": "model.norm.weight",
      "lm_head/kernel": "lm_head.weight",
      "blocks/attn_norm/scale": "model.layers.{i}.input_layernorm.weight",
      "blocks/mlp_norm/scale": "model.layers.{i}.post_attention_layernorm.weight",
  }
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    names[f"blocks/attn/{proj}/kernel"] = f"model.layers.{{i}}.self_attn.{proj}.weight"
    names[f"blocks/attn/{proj}/bias"] = f"model.layers.{{i}}.self_attn.{proj}.bias"
  for proj in ("gate_proj", "up_proj", "down_proj"):
    names[f"blocks/mlp/{proj}/kernel"] = f"model.layers.{{i}}.mlp.{proj}.weight"
  return names


NAMES = _tensor_names()


def _unsupported(where: str, name: str, value, allowed: str) -> ValueError:
  return ValueError(f"{where}: {name}={value!r} is not supported; allowed: {allowed}")


def _rope(cfg: dict, where: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
  rope = dict(cfg.get("rope_scaling") or {})
  rope.update(cfg.get("rope_parameters") or {})
  theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise _unsupported(where, "rope_type", kind, "default, llama3")
  return theta, RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                            high_freq_factor=float(rope["high_freq_factor"]),
                            original_max_position=int(rope["original_max_position_embeddings"]))


def config_from_json(cfg: dict, where: str = "config.json") -> Config:
  """The model configuration of a Hugging Face config.json (as a dict)."""
  model_type = cfg.get("model_type")
  if model_type not in MODEL_TYPES:
    raise _unsupported(where, "model_type", model_type, ", ".join(MODEL_TYPES))
  if cfg.get("hidden_act", "silu") != "silu":
    raise _unsupported(where, "hidden_act", cfg["hidden_act"], "silu")
  if cfg.get("mlp_bias", False):
    raise _unsupported(where, "mlp_bias", True, "false")
  if model_type == "qwen2" and cfg.get("use_sliding_window", False):
    raise _unsupported(where, "use_sliding_window", True, "false")
  theta, scaling = _rope(cfg, where)
  heads = int(cfg["num_attention_heads"])
  eos = cfg.get("eos_token_id")
  attention_bias = bool(cfg.get("attention_bias", False))
  return Config(
      arch=model_type,
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or attention_bias,
      o_bias=model_type == "llama" and attention_bias,
      sliding_window=cfg.get("sliding_window") if model_type == "mistral" else None,
      bos_id=cfg.get("bos_token_id"),
      eos_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),),
      pad_id=cfg.get("pad_token_id"),
  )


def shard_files(directory: Path) -> dict[str, Path]:
  """{tensor name: safetensors file} from the sharded index, or from the single model.safetensors."""
  index = directory / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}
  single = directory / SINGLE_FILE
  if not single.is_file():
    raise FileNotFoundError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
  with safe_open(str(single), framework="flax") as f:
    return {name: single for name in f.keys()}


def load(directory: str | Path, dtype="float32", param_dtype=np.float32, per_tensor=None, **config_overrides
         ) -> tuple[Config, dict, Tokenizer | None]:
  """(config, float params, tokenizer or None) from a Hugging Face model directory; `per_tensor` as in
  `checkpoint.assemble`."""
  directory = Path(directory)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory}: config.json not found")
  config = config_from_json(json.loads(config_file.read_text()), where=str(config_file))
  config = config.replace(dtype=dtype, **config_overrides)
  files = shard_files(directory)
  handles = {}

  def handle(name):
    path = files[name]
    if path not in handles:
      if not path.is_file():
        raise FileNotFoundError(f"{directory}: shard {path.name} (listed for {name}) not found")
      handles[path] = safe_open(str(path), framework="flax")
    return handles[path]

  def ignore(name):
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")

  params = assemble.assemble(
      config, NAMES, files, shape_of=lambda n: tuple(handle(n).get_slice(n).get_shape()),
      read=lambda n: np.asarray(handle(n).get_tensor(n), np.float32), where=str(directory), ignore=ignore,
      dtype=param_dtype, per_tensor=per_tensor)
  tokenizer = from_hf_dir(directory, bos_id=config.bos_id, eos_ids=config.eos_ids, pad_id=config.pad_id)
  return config, params, tokenizer
