"""Loading GGUF files (llama.cpp's format): configuration, float parameters and tokenizer.

    config, params, tokenizer = gguf.load(path)
    config, params, tokenizer = gguf.load(path, keep_quantized=True)   # block linears, table as `int` QTensors

Tensors are dequantized to float32 with `gguf.quants.dequantize` (types in SUPPORTED_TYPES). A GGUF weight
has numpy shape [out, in]; it becomes an [in, out] kernel. llama.cpp's converter permutes the rows of the
LLaMA q and k projections so that each head's two rotary halves are interleaved (its rotation pairs adjacent
rows, where Hugging Face's pairs row j with row j + d/2); `unpermute_rows` undoes that, `permute_rows` redoes it.

Block types that hold an `int` QTensor exactly (ggml's block layouts, as gguf-py's `quants` module reads them).
Each row of a weight [out, in] is cut into blocks of 32 consecutive inputs; per block, little-endian:

    Q4_0  d: float16, qs: 16 bytes                 w = d * (q - 8),  q in 0..15
    Q4_1  d: float16, m: float16, qs: 16 bytes     w = d * q + m,    q in 0..15
    Q8_0  d: float16, qs: 32 int8                  w = d * q,        q in -128..127

In Q4_0 and Q4_1, byte j of qs holds element j in its low nibble and element j + 16 in its high nibble.
An `int` QTensor with float16 scale and offset and a group size that is a multiple of 32 is such a block grid
(which type holds which setting, and how its codes shift: qalora_jax.export.gguf). A file that module writes
names each such tensor's bits, group size and symmetry in the metadata key QTENSORS_KEY (JSON), so
`keep_quantized` restores the QTensor it was written from, bit for bit; without that key a block tensor reads
as 4-bit (Q4_0, Q4_1) or 8-bit (Q8_0), group 32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import gguf
import jax.numpy as jnp
import numpy as np

from qalora_jax.models import assemble
from qalora_jax.models.config import Config
from qalora_jax.models.tokenizer import Tokenizer, from_gguf_metadata
from qalora_jax.quant import QMeta, QTensor, pack

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
BLOCK = 32  # weights per block of the exact types
EXACT_TYPES = (_T.Q4_0, _T.Q4_1, _T.Q8_0)
QTENSORS_KEY = "qalora_jax.qtensors"  # {tensor name: {"bits": k, "group_size": g, "symmetric": bool}} as JSON


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


def rotary_heads(config: Config, path: str) -> int | None:
  """The head count of the LLaMA q or k projection parameter at `path`, whose rows llama.cpp permutes; else None."""
  if config.arch != "llama":
    return None
  return config.num_heads if "/q_proj/" in path else config.num_kv_heads if "/k_proj/" in path else None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation of a weight [n_heads * d, ...] (or bias [n_heads * d]).

  Within each head, llama.cpp stores row j of the first rotary half at 2j and row j of the second half at
  2j + 1; so read the rows as [head, j, half] and swap to [head, half, j].
  """
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k row order from Hugging Face's (the inverse of `unpermute_rows`): within each head, rows
  j and j + d/2 go to 2j and 2j + 1."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------- exact block types


def encode_blocks(qtype, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
  """The bytes [rows, n_blocks * block bytes] of a Q4_0, Q4_1 or Q8_0 weight from its codes q [rows, n_blocks * 32]
  (0..15, or -128..127 for Q8_0), d and (Q4_1) m [rows, n_blocks] float16 (layouts in the module doc)."""
  rows, cols = q.shape
  nb = cols // BLOCK
  qb = np.asarray(q).reshape(rows, nb, BLOCK)
  parts = [np.asarray(d, np.float16).reshape(rows, nb, 1).view(np.uint8)]
  if qtype == _T.Q4_1:
    parts.append(np.asarray(m, np.float16).reshape(rows, nb, 1).view(np.uint8))
  if qtype in (_T.Q4_0, _T.Q4_1):
    qb = qb.astype(np.uint8)
    parts.append(qb[..., :BLOCK // 2] | (qb[..., BLOCK // 2:] << np.uint8(4)))
  elif qtype == _T.Q8_0:
    parts.append(qb.astype(np.int8).view(np.uint8))
  else:
    raise ValueError(f"qtype={gguf.GGMLQuantizationType(qtype).name} is not supported; allowed: "
                     f"{', '.join(t.name for t in EXACT_TYPES)}")
  return np.concatenate(parts, axis=-1).reshape(rows, -1)


def decode_blocks(qtype, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Inverse of `encode_blocks`: (q [rows, cols] uint8 (int8 for Q8_0), d, m or None [rows, n_blocks] float16)."""
  block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
  rows = data.shape[0]
  b = np.ascontiguousarray(data).reshape(rows, -1, block_bytes)
  d = b[..., 0:2].copy().view(np.float16)[..., 0]
  m = None
  if qtype == _T.Q4_1:
    m, qs = b[..., 2:4].copy().view(np.float16)[..., 0], b[..., 4:]
  else:
    qs = b[..., 2:]
  if qtype == _T.Q8_0:
    q = qs.copy().view(np.int8)
  else:
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)
  return q.reshape(rows, -1), d, m


def qtensor_from_blocks(qtype, data: np.ndarray, bits: int | None = None, group_size: int = BLOCK,
                        symmetric: bool | None = None, where: str = "tensor") -> QTensor:
  """The `int` QTensor [in, out] of one block-typed GGUF weight [out, in] (rows in file order); `bits`,
  `group_size`, `symmetric` as the file's QTENSORS_KEY says (default: what the type holds, group 32)."""
  q, d, m = decode_blocks(qtype, data)
  n_out, n_in = q.shape
  if symmetric is None:
    symmetric = qtype != _T.Q4_1
  if bits is None:
    bits = 8 if qtype == _T.Q8_0 else 4
  if symmetric != (qtype != _T.Q4_1) or group_size % BLOCK or bits > (8 if qtype == _T.Q8_0 else 4):
    raise ValueError(f"{where}: a {gguf.GGMLQuantizationType(qtype).name} tensor cannot hold bits={bits}, "
                     f"group_size={group_size}, symmetric={symmetric}")
  half = 2 ** (bits - 1)
  if qtype == _T.Q4_1:
    c = q.astype(np.int32)
  elif qtype == _T.Q4_0:
    c = q.astype(np.int32) - 8 + half
  else:
    c = q.astype(np.int32) + half
  if c.min() < 0 or c.max() >= 2**bits:
    raise ValueError(f"{where}: codes outside 0..{2**bits - 1} for bits={bits}")
  per = group_size // BLOCK
  starts = np.arange(0, d.shape[1], per)

  def grouped(x):  # [out, n_blocks] -> [n_groups, out], checking that each group repeats one value
    g = x[:, starts]
    if not np.array_equal(np.repeat(g, per, axis=1)[:, :x.shape[1]].view(np.uint16), x.view(np.uint16)):
      raise ValueError(f"{where}: blocks of one group of {group_size} differ in their scale or offset")
    return jnp.asarray(g.T)

  arrays = {"codes": pack(jnp.asarray(c.T.astype(np.uint8)), bits, np.uint32), "scale": grouped(d)}
  if m is not None:
    arrays["offset"] = grouped(m)
  return QTensor(arrays, QMeta("int", (n_in, n_out), bits, group_size, (("symmetric", bool(symmetric)),)))


def _quantized_leaves(config: Config, tensors: dict, meta: dict, keep: str = ".*") -> dict[str, list[QTensor]]:
  """{parameter path: per-layer QTensors} for every block linear whose layers are all stored in one exact block
  type with the same settings (q and k rows back in Hugging Face's order), and for the token table when it is
  stored in one: its rows [V, D] in blocks along D are the [D, V] QTensor of models.quantize's layout. Only
the paths `keep` matches (re.fullmatch) are considered."""
  settings = json.loads(meta.get(QTENSORS_KEY, "{}"))
  out = {}
  for path, name in NAMES.items():
    if not re.fullmatch(keep, path):
      continue
    if path == "embed/embedding":
      layers = [tensors.get(name)]
    elif path.startswith("blocks/") and path.endswith("/kernel"):
      layers = [tensors.get(name.format(i=i)) for i in range(config.num_layers)]
    else:
      continue
    if any(t is None or t.tensor_type not in EXACT_TYPES for t in layers):
      continue
    heads = rotary_heads(config, path)
    qts = []
    for t in layers:
      data = np.asarray(t.data) if heads is None else unpermute_rows(np.asarray(t.data), heads)
      qts.append(qtensor_from_blocks(t.tensor_type, data, where=t.name, **settings.get(t.name, {})))
    if len({qt.meta for qt in qts}) == 1:
      out[path] = qts
  return out


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


def load(path: str | Path, dtype="float32", param_dtype=np.float32, per_tensor=None, keep_quantized: bool | str = False,
         **config_overrides) -> tuple[Config, dict, Tokenizer]:
  """(config, params, tokenizer) from a GGUF file; `config_overrides` replace Config fields; `per_tensor` as in
  `checkpoint.assemble`. Parameters are float, except with `keep_quantized`: then every block linear whose
  layers are all stored in Q4_0, Q4_1 or Q8_0 (with one setting), and the token table if it is (SmolLM2's is
  Q8_0), is the `int` QTensor those blocks hold exactly (see the module doc; the table as its [D, V]
  transpose), and `per_tensor` applies to the other leaves only. A string keeps only the parameter paths it
  matches (a regex, e.g. "embed/embedding")."""
  path = Path(path)
  reader = gguf.GGUFReader(str(path))
  tensors = {t.name: t for t in reader.tensors}
  for t in tensors.values():
    check_type(t)
  shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
  meta = read_metadata(reader)
  config = config_from_metadata(meta, shapes, where=str(path)).replace(dtype=dtype, **config_overrides)

  keep = ".*" if keep_quantized is True else keep_quantized
  quantized = _quantized_leaves(config, tensors, meta, keep) if keep else {}
  skipped = {NAMES[p].format(i=i) for p in quantized for i in range(config.num_layers)}
  pending = {p: iter(qts) for p, qts in quantized.items()}  # one QTensor a layer, in order
  float_per_tensor = per_tensor or (lambda p, w: jnp.asarray(w, param_dtype))

  def transform(param_path, name, w):  # a kept QTensor's tensor is not read: nothing to permute
    heads = None if name in skipped else rotary_heads(config, param_path)
    return w if heads is None else unpermute_rows(w, heads)

  def read(name):  # a kept QTensor's tensor is not read as floats: `per_tensor_leaf` supplies the leaf
    return np.empty(0, np.float32) if name in skipped else tensor_to_numpy(tensors[name])

  def per_tensor_leaf(param_path, w):
    return next(pending[param_path]) if param_path in pending else float_per_tensor(param_path, w)

  params = assemble.assemble(
      config, NAMES, tensors, shape_of=lambda n: shapes[n], read=read, where=str(path),
      transform=transform, dtype=param_dtype, ignore=lambda n: n == "rope_freqs.weight", per_tensor=per_tensor_leaf)
  return config, params, from_gguf_metadata(meta)
