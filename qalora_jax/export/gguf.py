"""GGUF export (llama.cpp's format) of a model whose block linears are `int` QTensors, written exactly.

    report = export_gguf("model.gguf", lm.config, merged_params, lm.tokenizer, source="SmolLM2.Q4_1.gguf")

Weights. An `int` QTensor with float16 scale and offset, w = scale * q + offset, and a group size that is a
multiple of 32 is llama.cpp's Q4_1 grid with each group's (scale, offset) repeated over its 32-blocks: a merged
QA-LoRA model (offset' = offset + s (A B), still float16) is written with no rounding at all. The types:

    int, asymmetric, bits <= 4   -> Q4_1   w = d * q + m        (2- and 3-bit codes cost 4 bits, lose nothing)
    int, symmetric,  bits <= 4   -> Q4_0   w = d * (q - 8)      q = c - 2^(k-1) + 8
    int, symmetric,  bits <= 8   -> Q8_0   w = d * q            q = c - 2^(k-1)

(block layouts in qalora_jax.models.gguf). Everything else is refused with a one-line error that names the
setting and the nearest exportable one: asymmetric 5..8 bits (no GGUF block has a k > 4-bit code with an
offset), group sizes that are not multiples of 32, non-uniform codebooks (nf4, fp4, nf-offset). Scales or
offsets in float32 or bfloat16 are written as float16 only when that changes no value; otherwise the export
refuses and says by how much rounding would change the weights (max |dw|), unless `allow_rounding`, which
writes them and reports max |dw| per tensor. The bits, group size and symmetry of every QTensor go into the
metadata key `models.gguf.QTENSORS_KEY`, so `models.load(path, keep_quantized=True)` restores the same
QTensors bit for bit. llama.cpp ignores that key.

Float tensors (embedding, norms, biases, a float head or float linears): `float_type="source"` writes each in
the type it has in the source GGUF when that type reproduces its values exactly (SmolLM2's Q8_0 embedding
does), else F32; "f32" writes F32; "f16" writes F16 (rounding, so only with `allow_rounding`). One-dimensional
tensors (norms, biases) are always F32, as llama.cpp's converters write them. A tied head is not written
(llama.cpp then uses token_embd). LLaMA q and k rows are permuted into llama.cpp's rotary order
(`models.gguf.permute_rows`); tensor names and `{arch}.*` keys are llama.cpp's.

Metadata and tokenizer come from the source GGUF (every key but the architecture's, which are written from
the config, and the file type). Without a source, the tokenizer is described from its `tokenizers` JSON with
the `gguf` writer's helpers: a byte-level BPE (tokenizer.ggml.model "gpt2") with its vocabulary, merges, token
types (special added tokens CONTROL, other added tokens USER_DEFINED) and special ids; the pre-tokenizer name
is "gpt2" for a ByteLevel pre-tokenizer with GPT-2's regex, "smollm" for Digits(individual) + ByteLevel, or
the GGUF name whose splits a tokenizer read from a GGUF file carries. Other tokenizers are refused.

The file is written beside `out` under a temporary name and renamed into place: a failure leaves no file.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import gguf
import jax
import numpy as np

from qalora_jax.files import atomic_file
from qalora_jax.models import gguf as gguf_io
from qalora_jax.models.config import Config
from qalora_jax.models.llama import unstack_blocks
from qalora_jax.tree_paths import flatten
from qalora_jax.models.tokenizer import GGUF_PRE_SPLITS, Tokenizer
from qalora_jax.quant import QTensor, unpack

FLOAT_TYPES = ("source", "f32", "f16")
_T = gguf.GGMLQuantizationType
_CONTROL, _USER_DEFINED, _NORMAL = 3, 4, 1


def _nearest_group(g: int) -> int:
  return max(gguf_io.BLOCK, gguf_io.BLOCK * round(g / gguf_io.BLOCK))


def block_type(qt: QTensor, where: str = "tensor") -> _T:
  """The GGUF type that holds `qt` exactly, or ValueError naming the setting and the nearest exportable one."""
  n_in = qt.shape[0]
  g = qt.group_size
  symmetric = bool(qt.meta.option("symmetric", False))
  if qt.format != "int":
    raise ValueError(f"{where}: format={qt.format!r} (bits={qt.bits}, group_size={g}) is a non-uniform codebook, "
                     f"which no GGUF type stores exactly; nearest exportable: int with bits={min(qt.bits, 4)}, "
                     f"group_size={_nearest_group(g)} (Q4_1)")
  if n_in % gguf_io.BLOCK:
    raise ValueError(f"{where}: input size {n_in} is not exportable: GGUF blocks hold 32 weights of a row; "
                     f"allowed: a multiple of 32")
  if g % gguf_io.BLOCK:
    raise ValueError(f"{where}: group_size={g} is not exportable: GGUF blocks hold 32 weights; allowed: a multiple "
                     f"of 32 (nearest: group_size={_nearest_group(g)})")
  if not symmetric and qt.bits > 4:
    raise ValueError(f"{where}: bits={qt.bits} with symmetric=False is not exportable: no GGUF block stores a "
                     f"{qt.bits}-bit code with an offset; nearest exportable: bits=4 (Q4_1) or symmetric=True (Q8_0)")
  if not symmetric:
    return _T.Q4_1
  return _T.Q4_0 if qt.bits <= 4 else _T.Q8_0


def _to_float16(x: np.ndarray) -> tuple[np.ndarray, bool]:
  """(x as float16, whether that is exact)."""
  with np.errstate(over="ignore"):
    h = x.astype(np.float16)
  return h, bool(np.all(np.isfinite(h)) and np.array_equal(h.astype(x.dtype), x))


def qtensor_blocks(qt: QTensor, n_heads: int | None = None, allow_rounding: bool = False, where: str = "tensor"
                   ) -> tuple[_T, np.ndarray, float]:
  """(type, bytes [out, row bytes], max |dw|) of one [in, out] QTensor as a GGUF weight [out, in]; rows are
  permuted into llama.cpp's rotary order when `n_heads` is given. max |dw| is 0 unless scales or offsets had
  to be rounded to float16 (refused unless `allow_rounding`)."""
  qtype = block_type(qt, where)
  n_in, _ = qt.shape
  bits, g = qt.bits, qt.group_size
  c = np.asarray(unpack(qt["codes"], bits, n_in)).T.astype(np.int32)  # [out, in]
  scale = np.asarray(qt["scale"])
  offset = np.asarray(qt["offset"]) if "offset" in qt.arrays else None
  d, exact = _to_float16(scale)
  m, exact_m = (None, True) if offset is None else _to_float16(offset)
  dw = 0.0
  if not (exact and exact_m):
    rounded = QTensor({**qt.arrays, "scale": d, **({} if m is None else {"offset": m})}, qt.meta)
    dw = float(np.max(np.abs(np.asarray(qt.dequantize(), np.float64) - np.asarray(rounded.dequantize(), np.float64))))
    if not allow_rounding:
      raise ValueError(f"{where}: scale_dtype={scale.dtype} is not exportable exactly: every GGUF block stores "
                       f"float16 scales and offsets, and rounding them changes weights by up to max |dw| = {dw:.3g}; "
                       f"allowed: scale_dtype=float16 (nearest exportable), or allow rounding (--allow-rounding)")
  per = g // gguf_io.BLOCK
  n_blocks = n_in // gguf_io.BLOCK

  def blocks(x):  # [n_groups, out] -> [out, n_blocks]: each group's value over its 32-blocks
    return np.repeat(x, per, axis=0)[:n_blocks].T

  half = 2 ** (bits - 1)
  q = c if qtype == _T.Q4_1 else c - half + (8 if qtype == _T.Q4_0 else 0)
  rows = [q, blocks(d)] + ([] if m is None else [blocks(m)])
  if n_heads is not None:
    rows = [gguf_io.permute_rows(r, n_heads) for r in rows]
  return qtype, gguf_io.encode_blocks(qtype, *rows), dw


def float_tensor(w: np.ndarray, float_type: str, source_type: _T | None = None, allow_rounding: bool = False,
                 where: str = "tensor") -> tuple[_T, np.ndarray, float, str | None]:
  """(type, data, max |dw|, note) of a float tensor in the GGUF layout (see the module doc for `float_type`)."""
  w = np.asarray(w, np.float32)
  if w.ndim == 1 or float_type == "f32":
    return _T.F32, w, 0.0, None
  if float_type == "f16":
    h = w.astype(np.float16)
    dw = float(np.max(np.abs(h.astype(np.float32) - w)))
    if dw > 0 and not allow_rounding:
      raise ValueError(f"{where}: float_type='f16' rounds it by up to max |dw| = {dw:.3g}; allowed: float_type "
                       f"'source' or 'f32' (exact), or allow rounding (--allow-rounding)")
    return _T.F16, h, dw, None
  if source_type is None or source_type == _T.F32:
    return _T.F32, w, 0.0, None
  try:
    data = gguf.quants.quantize(w, source_type)
    back = np.asarray(gguf.quants.dequantize(data, source_type), np.float32).reshape(w.shape)
  except (NotImplementedError, ValueError):
    back = None
  if back is not None and np.array_equal(back, w):
    return source_type, data, 0.0, None
  return _T.F32, w, 0.0, f"F32: the source type {source_type.name} does not hold its values exactly"


# -------------------------------------------------------------------------------------------- tokenizer


def _pre_name(pre: dict | None) -> str:
  """tokenizer.ggml.pre for a `tokenizers` pre-tokenizer spec (see the module doc), or ValueError."""
  steps = [] if pre is None else (pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre])
  kinds = [s.get("type") for s in steps]
  byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
  if byte_level is not None and not byte_level.get("add_prefix_space", False):
    regex = byte_level.get("use_regex", True)
    if regex and kinds == ["ByteLevel"]:
      return "gpt2"
    if regex and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
      return "smollm"
    if not regex and all(k == "Split" and s.get("behavior") == "Isolated" for k, s in zip(kinds[:-1], steps)):
      splits = tuple((s.get("pattern") or {}).get("Regex") for s in steps[:-1])
      names = [n for n, rx in GGUF_PRE_SPLITS.items() if rx == splits]
      if names:
        return names[0]
  raise ValueError(f"tokenizer pre_tokenizer {' + '.join(map(str, kinds)) or None} is not supported by GGUF "
                   f"export; allowed: ByteLevel (gpt2), Digits + ByteLevel (smollm), or a GGUF file's tokenizer")


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
  """Describes a byte-level BPE tokenizer in the tokenizer.ggml.* keys (see the module doc), or ValueError."""
  spec = json.loads(tokenizer.backend.to_str())
  model = spec.get("model") or {}
  decoder = (spec.get("decoder") or {}).get("type")
  if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
    raise ValueError(f"tokenizer model={model.get('type')!r} with decoder={decoder!r} is not supported by GGUF "
                     f"export; allowed: a byte-level BPE (BPE model, ByteLevel decoder)")
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  if not merges:
    raise ValueError("tokenizer has no BPE merges, and a GGUF file cannot hold an empty tokenizer.ggml.merges "
                     "(llama.cpp requires the key); allowed: a byte-level BPE with merges")
  pre = _pre_name(spec.get("pre_tokenizer"))
  ids = dict(model["vocab"])
  types = {}
  for t in spec.get("added_tokens") or []:
    ids[t["content"]] = t["id"]
    types[t["id"]] = _CONTROL if t.get("special") else _USER_DEFINED
  n = max(ids.values()) + 1
  tokens = [None] * n
  for token, i in ids.items():
    tokens[i] = token
  if any(t is None for t in tokens):
    raise ValueError(f"tokenizer: ids {[i for i, t in enumerate(tokens) if t is None][:5]} have no token; allowed: "
                     f"a vocabulary of consecutive ids")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([types.get(i, _NORMAL) for i in range(n)])
  writer.add_token_merges(merges)
  if tokenizer.bos_id is not None:
    writer.add_bos_token_id(tokenizer.bos_id)
  if tokenizer.eos_ids:
    writer.add_eos_token_id(tokenizer.eos_ids[0])
  if tokenizer.pad_id is not None:
    writer.add_pad_token_id(tokenizer.pad_id)
  ids_a = tokenizer.encode("a")
  writer.add_add_bos_token(bool(tokenizer.bos_id is not None and ids_a[:1] == [tokenizer.bos_id]))


# ------------------------------------------------------------------------------------------------ export


def _check_config(config: Config) -> None:
  if config.arch not in gguf_io.ARCHITECTURES:
    raise ValueError(f"arch={config.arch!r} is not supported by GGUF export; allowed: "
                     f"{', '.join(gguf_io.ARCHITECTURES)}")
  if config.rope_scaling is not None:
    raise ValueError(f"rope_scaling={config.rope_scaling.kind!r} is not supported by GGUF export; allowed: None")
  if config.sliding_window is not None:
    raise ValueError(f"sliding_window={config.sliding_window} is not supported by GGUF export; allowed: None")


def _architecture_keys(writer: gguf.GGUFWriter, config: Config) -> None:
  writer.add_block_count(config.num_layers)
  writer.add_context_length(config.max_seq_len)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.rms_eps)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_vocab_size(config.vocab_size)
  if config.head_dim != config.hidden_size // config.num_heads:
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def _named_leaves(params: dict):
  """Yields (GGUF tensor name, parameter path, leaf) for every parameter (blocks in the per-layer layout)."""
  for path, leaf in flatten(unstack_blocks(params)):
    if path.endswith("/adapter"):
      raise ValueError(f"params hold an adapter ({path}); allowed: a merged model (merge the adapters first)")
    i, key = 0, path
    if path.startswith("blocks/"):
      _, i, rest = path.split("/", 2)
      key = f"blocks/{rest}"
    if key not in gguf_io.NAMES:
      raise ValueError(f"parameter {path} has no GGUF tensor name")
    yield gguf_io.NAMES[key].format(i=int(i)), key, leaf


def check_out(out: str | Path, overwrite: bool) -> None:
  """FileExistsError when `out` exists and may not be replaced."""
  if Path(out).exists() and not overwrite:
    raise FileExistsError(f"{out} exists; choose another output path or allow overwriting (--overwrite)")


def _file_order(entry) -> tuple:
  """token_embd, the blocks in order, then output_norm and output (the order llama.cpp's converters write)."""
  name = entry[0]
  if name.startswith("blk."):
    return (1, int(name.split(".")[1]), name)
  return (0 if name.startswith("token_embd") else 2, 0, name)


def export_gguf(out: str | Path, config: Config, params: dict, tokenizer: Tokenizer | None = None, *,
                source: str | Path | None = None, float_type: str = "source", allow_rounding: bool = False,
                overwrite: bool = False) -> dict:
  """Writes `params` (QTensor block linears, float leaves) as a GGUF file `out` (see the module doc) and
  returns a report: {"out", "bytes", "types": {type: count}, "max_abs_dw", "rounded": {tensor: max |dw|},
  "notes": {tensor: note}}. `source`: the GGUF file the model came from (metadata, tokenizer, float types)."""
  out = Path(out)
  if float_type not in FLOAT_TYPES:
    raise ValueError(f"float_type={float_type!r} is not supported; allowed: {', '.join(FLOAT_TYPES)}")
  check_out(out, overwrite)
  _check_config(config)
  reader = gguf.GGUFReader(str(source)) if source is not None else None
  source_types = {} if reader is None else {t.name: t.tensor_type for t in reader.tensors}
  if reader is None and tokenizer is None:
    raise ValueError("tokenizer=None with no source GGUF: llama.cpp needs the tokenizer; pass the model's "
                     "tokenizer or the GGUF file it came from")

  tensors, settings, rounded, notes = [], {}, {}, {}
  for name, path, leaf in _named_leaves(params):
    n_heads = gguf_io.rotary_heads(config, path)
    if isinstance(leaf, QTensor):
      qtype, data, dw = qtensor_blocks(leaf, n_heads, allow_rounding, where=f"{path} ({name})")
      settings[name] = {"bits": leaf.bits, "group_size": leaf.group_size,
                        "symmetric": bool(leaf.meta.option("symmetric", False))}
    else:
      w = np.asarray(jax.device_get(leaf), np.float32)
      w = w.T if path.endswith("/kernel") else w
      if n_heads is not None:
        w = gguf_io.permute_rows(w, n_heads)
      qtype, data, dw, note = float_tensor(w, float_type, source_types.get(name), allow_rounding, where=name)
      if note:
        notes[name] = note
    if dw > 0:
      rounded[name] = dw
    tensors.append((name, data, qtype))

  tensors.sort(key=_file_order)
  linear_types = [t for n, _, t in tensors if n.startswith("blk.") and n.split(".")[2] in gguf_io.BLOCK_LINEARS]
  file_types = {_T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, _T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
                _T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, _T.F16: gguf.LlamaFileType.MOSTLY_F16}
  common = max(set(linear_types), key=linear_types.count) if linear_types else _T.F32
  file_type = file_types.get(common, gguf.LlamaFileType.ALL_F32)

  own = (f"{config.arch}.", "general.architecture", "general.file_type", "general.quantization_version",
         gguf_io.QTENSORS_KEY)
  with atomic_file(out) as tmp:
    writer = gguf.GGUFWriter(tmp, config.arch)
    try:
      if reader is not None:
        for key, field in reader.fields.items():
          if key.startswith("GGUF.") or key.startswith(own):
            continue
          sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
          writer.add_key_value(key, field.contents(), field.types[0], sub)
      else:
        write_tokenizer(writer, tokenizer)
      _architecture_keys(writer, config)
      writer.add_file_type(file_type)
      writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
      writer.add_string(gguf_io.QTENSORS_KEY, json.dumps(settings, sort_keys=True))
      for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
      writer.write_header_to_file()
      writer.write_kv_data_to_file()
      writer.write_tensors_to_file()
    finally:
      writer.close()
  types = dict(collections.Counter(qtype.name for _, _, qtype in tensors))
  return {"out": str(out), "bytes": out.stat().st_size, "types": types,
          "max_abs_dw": max(rounded.values(), default=0.0), "rounded": rounded, "notes": notes}
