"""Loading GGUF files (llama.cpp's format): configuration, float parameters and tokenizer.

    config, params, tokenizer = gguf.load(path)

Tensors are dequantized to float32 with `gguf.quants.dequantize` (types in SUPPORTED_TYPES). A GGUF weight
has numpy shape [out, in]; it becomes an [in, out] kernel. llama.cpp's converter permutes the rows of the
LLaMA q and k projections so that each head's two rotary halves are interleaved (its rotation pairs adjacent
rows, where Hugging Face's pairs row j with row j + d/2); `unpermute_rows` undoes that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from qalora_jax.models import checkpoint
from qalora_jax.models.config import Config
from qalora_jax.models.tokenizer import Tokenizer, from_gguf_metadata

# The seven linear layers of a LLaMA block, GGUF name -> Hugging Face module name.
BLOCK_LINEARS = {
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
_LINEAR_RE = re.compile(r"blk\.(\d+)\.(" + "|".join(BLOCK_LINEARS) + r")\.weight")

_T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.BF16, _T.F64, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
                   _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K)
ARCHITECTURES = ("llama", "qwen2")


def _tensor_names() -> dict[str, str]:
  """Parameter path -> GGUF tensor name ("{i}": the block)."""
  names = {
      "embed/embedding": "token_embd.weight",
      "final_norm/scale": "output_norm.weight",
      "lm_head/kernel": "output.weight",
      "blocks/attn_norm/scale": "blk.{i}.attn_norm.weight",
      "blocks/mlp_norm/scale": "blk.{i}.ffn_norm.weight",
  }
  for gguf_name, hf_name in BLOCK_LINEARS.items():
    group = "attn" if gguf_name.startswith("attn_") else "mlp"
    names[f"blocks/{group}/{hf_name}/kernel"] = f"blk.{{i}}.{gguf_name}.weight"
    names[f"blocks/{group}/{hf_name}/bias"] = f"blk.{{i}}.{gguf_name}.bias"
  return names


NAMES = _tensor_names()


def check_type(t) -> None:
  if t.tensor_type not in SUPPORTED_TYPES:
    raise ValueError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, which is not supported; "
                     f"allowed: {', '.join(x.name for x in SUPPORTED_TYPES)}")


def tensor_to_numpy(t) -> np.ndarray:
  """A GGUF tensor as float32 with numpy's shape (reversed GGUF dims: [out, in] for a linear weight).

  Always a copy: a float32 tensor would otherwise be a view of the file's memory map and keep the whole
  mapping resident for as long as the parameter lives."""
  check_type(t)
  return np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32, copy=True).reshape(
      tuple(int(d) for d in reversed(t.shape)))


def linear_kernels(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, kernel [in, out] float32) for every block linear layer, in file order, as stored (the q and
  k kernels keep llama.cpp's column order, which permutes output channels only)."""
  reader = gguf.GGUFReader(str(path))
  for t in reader.tensors:
    if _LINEAR_RE.fullmatch(t.name):
      yield t.name, tensor_to_numpy(t).T


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation of a weight [n_heads * d, ...] (or bias [n_heads * d]).

  Within each head, llama.cpp stores row j of the first rotary half at 2j and row j of the second half at
  2j + 1; so read the rows as [head, j, half] and swap to [head, half, j].
  """
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader: gguf.GGUFReader) -> dict:
  """The key-value metadata as python values (strings, numbers, lists)."""
  return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def config_from_metadata(meta: dict, tensor_shapes: dict[str, tuple[int, ...]], where: str = "GGUF file") -> Config:
  """The model configuration stated by a GGUF file's metadata (and, for what metadata may omit, by the names
  and numpy shapes of its tensors)."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{where}: general.architecture={arch!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")

  def key(name, default=None):
    value = meta.get(f"{arch}.{name}", default)
    if value is None:
      raise ValueError(f"{where}: metadata key {arch}.{name} is missing")
    return value

  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in tensor_shapes:
    raise ValueError(f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported; allowed: none")
  hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
  tokens = meta.get("tokenizer.ggml.tokens")
  if tokens is not None:
    vocab = len(tokens)
  elif "token_embd.weight" in tensor_shapes:
    vocab = int(tensor_shapes["token_embd.weight"][0])
  else:
    vocab = int(key("vocab_size"))
  eos = meta.get("tokenizer.ggml.eos_token_id")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  pad = meta.get("tokenizer.ggml.padding_token_id")
  return Config(
      arch=arch,
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(key("feed_forward_length")),
      num_layers=int(key("block_count")),
      num_heads=heads,
      num_kv_heads=int(key("attention.head_count_kv", heads)),
      head_dim=int(key("attention.key_length", hidden // heads)),
      rope_theta=float(key("rope.freq_base", 10000.0)),
      rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
      max_seq_len=int(key("context_length")),
      tie_embeddings="output.weight" not in tensor_shapes,
      qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
      o_bias="blk.0.attn_output.bias" in tensor_shapes,
      bos_id=None if bos is None else int(bos),
      eos_ids=() if eos is None else (int(eos),),
      pad_id=None if pad is None else int(pad),
  )


def load(path: str | Path, dtype="float32", param_dtype=np.float32, finish=None, **config_overrides
         ) -> tuple[Config, dict, Tokenizer]:
  """(config, float params, tokenizer) from a GGUF file; `config_overrides` replace Config fields; `finish`
  as in `checkpoint.assemble`."""
  path = Path(path)
  reader = gguf.GGUFReader(str(path))
  tensors = {t.name: t for t in reader.tensors}
  for t in tensors.values():
    check_type(t)
  shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
  meta = read_metadata(reader)
  config = config_from_metadata(meta, shapes, where=str(path)).replace(dtype=dtype, **config_overrides)

  def transform(param_path, name, w):
    if config.arch == "llama" and "/q_proj/" in param_path:
      return unpermute_rows(w, config.num_heads)
    if config.arch == "llama" and "/k_proj/" in param_path:
      return unpermute_rows(w, config.num_kv_heads)
    return w

  params = checkpoint.assemble(
      config, NAMES, tensors, shape_of=lambda n: shapes[n],
      read=lambda n: tensor_to_numpy(tensors[n]), where=str(path), transform=transform, dtype=param_dtype,
      ignore=lambda n: n == "rope_freqs.weight", finish=finish)
  return config, params, from_gguf_metadata(meta)
