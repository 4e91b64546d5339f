"""GPTQ-layout checkpoints (AutoGPTQ "v1"): export a quantized model, import one back.

A directory holds `model.safetensors`, `quantize_config.json` and, when the model config is given,
`config.json`. For block linear i (HF module names, torch weights [out, in]; our kernels are [in, out]):

    model.layers.{i}.self_attn.q_proj.qweight  int32 [in * bits / 32, out]  codes packed along `in`
    model.layers.{i}.self_attn.q_proj.scales   fp16  [n_groups, out]
    model.layers.{i}.self_attn.q_proj.qzeros   int32 [n_groups, out * bits / 32]  (zero - 1) packed along `out`
    model.layers.{i}.self_attn.q_proj.g_idx    int32 [in]  = i // group_size (contiguous groups)

and w = scales[g_idx[r]] * (q[r] - zero[g_idx[r]]). Packing (qweight and qzeros): the k-bit values are laid
end to end, least significant bits first, in 32-bit words: 8 four-bit values per word with value 0 in the
lowest nibble; for 3 bits, 32 values fill 3 words and values 10 and 21 straddle word boundaries (value 10:
bits 30-31 of word 0 and bit 0 of word 1; value 21: bit 31 of word 1 and bits 0-1 of word 2). That is the
stream order of qalora_jax.quant.packing, so `qweight` is our packed `codes` reinterpreted as int32.
AutoGPTQ's layout needs `in` and `out` to be multiples of 32 (3 bits) or of 32 / bits.

Zeros. Our `int` format stores a float offset (w = scale * q + offset); GPTQ stores an integer zero with
offset = -scale * zero (qalora_jax.quant.gptq.zero_to_offset, the rule import uses too):
  zeros="int"   (default) every offset must be -scale * zero for an integer zero in 0..2^k-1, as `gptq`
                produces; they are written as `qzeros`. Stored is (zero - 1) mod 2^k, as AutoGPTQ writes it: a
                zero of 0 (a group with no negative weight) reads back here as 0 but as 2^k in AutoGPTQ's v1
                kernels, which add 1 without masking; `export_gptq` warns when that occurs.
  zeros="float" offsets that are not integer zeros (a QA-LoRA merge moves them: beta' = beta + s (A B)) are
                written as `qzeros_float`, float32 [n_groups, out], the float zero -offset / scale, with
                w = scales * (q - qzeros_float); quantize_config.json then says "checkpoint_format":
                "gptq_float_zeros", so loaders that only know packed integer zeros refuse it rather than
                misread it. (The QA-LoRA fork of AutoGPTQ keeps fp16 zeros; float32 makes this round trip
                exact: fp16(-scale * float32(-offset / scale)) == offset.)
  zeros="round" rounds each float zero to the nearest integer in 0..2^k-1 and writes `qzeros`; this changes
                the model: `rounding_change` gives the largest weight change max |dw|, `rounding_cost` the
                perplexity before and after.

Import (`import_gptq`) rebuilds the parameter tree with `int` QTensors; export then import gives bit-identical
codes, scales, offsets and so dequantized weights. Scales must be float16 (scale_dtype="float16").
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qalora_jax import models, tree_paths
from qalora_jax.files import atomic_dir, write_json
from qalora_jax.models import hf, llama
from qalora_jax.quant import QMeta, QTensor, pack, unpack
from qalora_jax.quant.gptq import offset_to_zero, zero_to_offset

GPTQ_BITS = (2, 3, 4, 8)
ZERO_MODES = ("int", "float", "round")
# The Hugging Face module of each parameter path's parent, from the loader's names ("{i}": the layer):
# "blocks/attn/q_proj" -> "model.layers.{i}.self_attn.q_proj", whose quantized kernel is written as .qweight etc.
MODULES = {path.rsplit("/", 1)[0]: name.rsplit(".", 1)[0] for path, name in hf.NAMES.items()}
WEIGHTS_FILE = "model.safetensors"


# -------------------------------------------------------------------------------------------- packing


def pack_words(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Packs k-bit values (int) along `axis` into int32 words, LSB first (AutoGPTQ's qweight / qzeros order)."""
  v = np.moveaxis(np.asarray(values), axis, 0).astype(np.uint32)
  if v.shape[0] * bits % 32 or (bits == 3 and v.shape[0] % 32):
    raise ValueError(f"{v.shape[0]} values of {bits} bits do not fill whole 32-bit words; allowed: a multiple "
                     f"of {32 if bits == 3 else 32 // bits}")
  words = np.asarray(pack(v, bits, np.uint32))
  return np.moveaxis(words.view(np.int32), 0, axis)


def unpack_words(words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
  """Inverse of `pack_words`: int32 words -> n values (uint8) along `axis`."""
  w = np.moveaxis(np.asarray(words), axis, 0).view(np.uint32)
  return np.moveaxis(np.asarray(unpack(w, bits, n)), 0, axis)


# ---------------------------------------------------------------------------------------------- zeros


def integer_zeros(qt: QTensor) -> tuple[np.ndarray, np.ndarray]:
  """(zero [n_groups, out] rounded, whether each offset is exactly -scale * zero with zero in 0..2^k-1)."""
  scale, offset = np.asarray(qt["scale"]), np.asarray(qt["offset"])
  zero = np.round(np.asarray(offset_to_zero(scale, offset)))
  exact = np.asarray(zero_to_offset(scale, zero, offset.dtype)) == offset
  return zero, exact & (zero >= 0) & (zero <= 2**qt.bits - 1)


def round_zeros(frozen: dict) -> dict:
  """The tree with every `int` QTensor's offsets moved to the nearest integer zero in 0..2^k-1:
  offset' = -scale * clip(round(-offset / scale), 0, 2^k - 1). Unmerged GPTQ tensors are unchanged."""

  def snap(leaf):
    if not (isinstance(leaf, QTensor) and leaf.format == "int" and "offset" in leaf.arrays):
      return leaf
    zero = jnp.clip(jnp.round(offset_to_zero(leaf["scale"], leaf["offset"])), 0, 2**leaf.bits - 1)
    return QTensor({**leaf.arrays, "offset": zero_to_offset(leaf["scale"], zero, leaf["offset"].dtype)}, leaf.meta)

  return jax.tree.map(snap, frozen, is_leaf=lambda x: isinstance(x, QTensor))


def _is_block_linear(path: str) -> bool:
  """Whether a stacked-layout path is the kernel of a block linear (every kernel under blocks/ is one)."""
  return path.startswith("blocks/") and path.endswith("/kernel")


def rounding_change(frozen: dict) -> float:
  """max |w_round - w| over the block linears: how far zeros="round" moves a weight, as a GPTQ reader dequantizes
  the export (w_round = scale * (q - z), z = clip(round(-offset / scale), 0, 2^k - 1)) against the tree's
  w = scale * q + offset. The codes cancel: w_round - w = -(scale * z + offset), one value per group."""
  worst = 0.0
  for path, leaf in tree_paths.flatten(llama.stack_blocks(frozen)):
    if (_is_block_linear(path) and isinstance(leaf, QTensor) and leaf.format == "int"
        and "offset" in leaf.arrays):
      zero = np.clip(np.round(np.asarray(offset_to_zero(leaf["scale"], leaf["offset"]))), 0, 2**leaf.bits - 1)
      change = np.asarray(leaf["scale"], np.float32) * zero + np.asarray(leaf["offset"], np.float32)
      worst = max(worst, float(np.abs(change).max()))
  return worst


def rounding_cost(lm, frozen: dict, ids, window: int = 512) -> dict:
  """What zeros="round" costs: {"ppl": with float zeros, "rounded_ppl": with rounded zeros, "delta"}."""
  ppl = models.perplexity(lm, ids, window=window, params=frozen)
  rounded = models.perplexity(lm, ids, window=window, params=round_zeros(frozen))
  return {"ppl": ppl, "rounded_ppl": rounded, "delta": rounded - ppl}


# ---------------------------------------------------------------------------------------------- export


def layer_tensors(qt: QTensor, zeros: str = "int") -> dict[str, np.ndarray]:
  """qweight, scales, qzeros (or qzeros_float) and g_idx of one [in, out] `int` QTensor (see module doc)."""
  if zeros not in ZERO_MODES:
    raise ValueError(f"zeros={zeros!r} is not supported; allowed: {', '.join(ZERO_MODES)}")
  if qt.format != "int" or "offset" not in qt.arrays or qt.arrays["codes"].ndim != 2:
    raise ValueError(f"GPTQ export takes one layer's asymmetric `int` QTensor (from gptq or int), got {qt!r}")
  if qt.bits not in GPTQ_BITS:
    raise ValueError(f"bits={qt.bits} is not supported by the GPTQ layout; allowed: {', '.join(map(str, GPTQ_BITS))}")
  if qt["scale"].dtype != jnp.float16:
    raise ValueError(f"scale dtype {qt['scale'].dtype} is not supported by the GPTQ layout; allowed: float16 "
                     f"(quantize with scale_dtype='float16')")
  n_in, n_out = qt.shape
  if zeros == "round":
    qt = round_zeros({"k": qt})["k"]
  codes = unpack(qt["codes"], qt.bits, n_in)
  out = {"qweight": pack_words(np.asarray(codes), qt.bits, axis=0),
         "scales": np.asarray(qt["scale"]),
         "g_idx": (np.arange(n_in) // qt.group_size).astype(np.int32)}
  if zeros == "float":
    if (np.asarray(qt["scale"]) == 0).any():
      raise ValueError("zeros='float' needs non-zero scales (a zero scale has no float zero); allowed: zeros='int'")
    out["qzeros_float"] = np.asarray(offset_to_zero(qt["scale"], qt["offset"]), np.float32)
    return out
  zero, exact = integer_zeros(qt)
  if not exact.all():
    raise ValueError(f"zeros='int': {int((~exact).sum())} of {exact.size} offsets are not -scale * (integer zero "
                     f"in 0..{2**qt.bits - 1}) (a QA-LoRA merge or `int` round to nearest makes float offsets); "
                     f"allowed: zeros='float' (float32 qzeros_float) or zeros='round' (see rounding_cost)")
  out["qzeros"] = pack_words((zero.astype(np.int64) - 1) % 2**qt.bits, qt.bits, axis=1)
  return out


def check_quantizer(quantizer, where: str) -> None:
  """Raises ValueError unless `quantizer` makes tensors the GPTQ layout holds (asymmetric `int`, bits 2/3/4/8,
  float16 scales): it quantizes a small random weight and lays it out as the export does. A quantizer that
  refuses the probe's shape is left to the export's own checks."""
  g = getattr(quantizer, "group_size", None)
  n_in = 2 * math.lcm(g, 32) if isinstance(g, int) and g > 0 else 64
  w = np.random.default_rng(0).standard_normal((n_in, 32)).astype(np.float32)
  try:
    quantizer.check_shape(w.shape)
  except ValueError:
    return
  qt = quantizer.quantize(w)
  if qt.format != "int" or "offset" not in qt.arrays:
    kind = f"{qt.format} tensors" if qt.format != "int" else "symmetric int tensors (no offset)"
    raise ValueError(f"{where}: {quantizer.name} with options {quantizer.options()} makes {kind}, which the GPTQ "
                     f"layout cannot hold; allowed: an asymmetric INT-k quantizer (int, int-mse or gptq with "
                     f"symmetric=False)")
  try:
    layer_tensors(qt, "float")
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _hf_config(config: models.Config, quantize_config: dict) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_eps,
          "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
          "bos_token_id": config.bos_id, "eos_token_id": list(config.eos_ids) if config.eos_ids else None,
          "hidden_act": "silu", "torch_dtype": "float16", "quantization_config": quantize_config}


def export_gptq(frozen: dict, out_dir: str | Path, *, config: models.Config | None = None, zeros: str = "int",
                overwrite: bool = False) -> Path:
  """Writes the quantized block linears of `frozen` (plus norms, embeddings, head) as a GPTQ-layout directory,
  atomically; returns its path."""
  if zeros not in ZERO_MODES:
    raise ValueError(f"zeros={zeros!r} is not supported; allowed: {', '.join(ZERO_MODES)}")
  params = llama.stack_blocks(frozen)
  tensors, kinds, zero_zeros = {}, set(), 0
  for path, leaf in tree_paths.flatten(params):
    if path not in hf.NAMES:
      raise ValueError(f"{path}: not part of a LLaMA GPTQ checkpoint")
    name = hf.NAMES[path]
    if _is_block_linear(path):
      if not isinstance(leaf, QTensor):
        raise ValueError(f"{path} is a float kernel; GPTQ export needs every block linear quantized (int or gptq)")
      kinds.add((leaf.bits, leaf.group_size, leaf.shape[0]))
      for i in range(leaf["codes"].shape[0]):
        layer = jax.tree.map(lambda a: a[i], leaf)
        for field, value in layer_tensors(layer, zeros).items():
          tensors[f"{MODULES[path.rsplit('/', 1)[0]].format(i=i)}.{field}"] = value
        if zeros != "float":
          zero_zeros += int((np.asarray(integer_zeros(round_zeros({"k": layer})["k"])[0]) == 0).sum())
    elif path.startswith("blocks/"):  # norms and biases, one tensor a layer
      for i in range(leaf.shape[0]):
        tensors[name.format(i=i)] = np.asarray(leaf[i])
    elif isinstance(leaf, QTensor):  # a quantized token table (stored [D, V]) is written as the float table it holds
      tensors[name] = np.asarray(leaf.dequantize().T)
    else:  # torch's weights are [out, in]
      tensors[name] = np.asarray(leaf).T if path.endswith("/kernel") else np.asarray(leaf)
  # One bits and group size for all linears: g for every layer wider than g, -1 when every group is a whole input.
  partial = {g for _, g, n_in in kinds if g < n_in}
  group_size = -1 if not partial else max(partial)
  all_bits = {b for b, _, _ in kinds}
  if len(all_bits) != 1 or any(g != (n_in if group_size == -1 else min(group_size, n_in)) for _, g, n_in in kinds):
    raise ValueError(f"GPTQ checkpoints hold one bits / group_size for all linears, got (bits, group, in) "
                     f"{sorted(kinds)}")
  bits, = all_bits
  if zero_zeros:
    warnings.warn(f"{zero_zeros} integer zeros are 0: stored as {2**bits - 1} (zero - 1 mod 2^{bits}); "
                  f"AutoGPTQ's v1 kernels read them as {2**bits}")
  quantize_config = {"bits": bits, "group_size": group_size, "desc_act": False, "static_groups": False,
                     "sym": False, "true_sequential": True, "damp_percent": 0.01, "quant_method": "gptq",
                     "checkpoint_format": "gptq_float_zeros" if zeros == "float" else "gptq",
                     "model_file_base_name": "model"}
  if zeros == "float":
    quantize_config["zeros"] = "qzeros_float: float32 [n_groups, out], w = scales * (q - qzeros_float)"
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
              metadata={"format": "pt"})
    write_json(tmp / "quantize_config.json", quantize_config)
    if config is not None:
      write_json(tmp / "config.json", _hf_config(config, quantize_config))
  return Path(out_dir)


# ---------------------------------------------------------------------------------------------- import

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_from_tensors(t: dict[str, np.ndarray], bits: int, group_size: int, n_in: int) -> QTensor:
  """The `int` QTensor of one layer's qweight / scales / qzeros (or qzeros_float) / g_idx."""
  qweight, scales = np.asarray(t["qweight"]), np.asarray(t["scales"])
  n_out = qweight.shape[1]
  g = n_in if group_size == -1 else min(group_size, n_in)
  if "g_idx" in t and not np.array_equal(np.asarray(t["g_idx"]), np.arange(n_in) // g):
    raise ValueError("g_idx: groups are not contiguous (act-order without static groups), which the `int` format "
                     "cannot represent; allowed: g_idx[r] = r // group_size")
  codes = unpack_words(qweight, bits, n_in, axis=0)
  if "qzeros_float" in t:
    zero = np.asarray(t["qzeros_float"], np.float32)
  else:
    zero = (unpack_words(np.asarray(t["qzeros"]), bits, n_out, axis=1).astype(np.int64) + 1) % 2**bits
  offset = zero_to_offset(scales, zero, scales.dtype)
  arrays = {"codes": pack(codes, bits, np.uint32), "scale": jnp.asarray(scales), "offset": offset}
  return QTensor(arrays, QMeta("int", (n_in, n_out), bits, g, (("symmetric", False),)))


def import_gptq(path: str | Path) -> tuple[dict, dict]:
  """(parameter tree in our stacked layout with `int` QTensors for the block linears, quantize_config)."""
  path = Path(path)
  quantize_config = json.loads((path / "quantize_config.json").read_text())
  bits, group_size = quantize_config["bits"], quantize_config["group_size"]
  if bits not in GPTQ_BITS:
    raise ValueError(f"{path}: bits={bits} is not supported; allowed: {', '.join(map(str, GPTQ_BITS))}")
  tensors = load_file(str(path / WEIGHTS_FILE))
  names = {name: path for path, name in hf.NAMES.items() if not _is_block_linear(path)}
  linears = {MODULES[path.rsplit("/", 1)[0]]: path.rsplit("/", 1)[0] for path in hf.NAMES if _is_block_linear(path)}
  per_layer: dict[int, dict[str, np.ndarray]] = {}
  leaves = {}
  for key, value in tensors.items():
    m = _LAYER_KEY.fullmatch(key)
    if m:
      per_layer.setdefault(int(m.group(1)), {})[f"model.layers.{{i}}.{m.group(2)}"] = value
    elif key in names:
      leaves[names[key]] = jnp.asarray(value.T if names[key].endswith("/kernel") else value)
    else:
      raise ValueError(f"{path}: unexpected tensor {key}")
  blocks = []
  for i in range(len(per_layer)):
    layer, quantized = {}, {}
    for name, value in per_layer[i].items():
      module, field = name.rsplit(".", 1)
      if name in names:  # norms and biases
        layer[names[name]] = jnp.asarray(value)
      elif module in linears:
        quantized.setdefault(module, {})[field] = value
      else:
        raise ValueError(f"{path}: unexpected tensor {name.format(i=i)}")
    for module, fields in quantized.items():
      n_in = fields["g_idx"].shape[0] if "g_idx" in fields else fields["qweight"].shape[0] * 32 // bits
      layer[f"{linears[module]}/kernel"] = layer_from_tensors(fields, bits, group_size, n_in)
    blocks.append(layer)
  for name in blocks[0]:
    leaves[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *[b[name] for b in blocks])
  return tree_paths.unflatten(leaves), quantize_config
