"""Adapters over a whole parameter tree: choose layers by regex, build the adapter tree, combine, merge.

A parameter tree is nested dicts; a linear layer is a dict holding a "kernel" (float [..., in, out] or a
QTensor; leading axes are stacked layers). The adapter tree has the same paths as the frozen tree, holding
only {"adapter": Adapter} at each adapted layer:

    frozen   = {"blocks": {"attn": {"q_proj": {"kernel": QTensor}}, ...}, "embed": ...}
    adapters = {"blocks": {"attn": {"q_proj": {"adapter": Adapter}}}}
    params   = combine(frozen, adapters)      # what the model's forward sees

The three methods are data: LoRA = float base + "lora"; QLoRA = nf4 base + "lora"; QA-LoRA = int (or gptq)
base + "qalora".
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp

from qalora_jax.nn.adapters import METHODS, Adapter, init_adapter, layer_key
from qalora_jax.nn.merge import check_qalora_base, merge_adapter
from qalora_jax.nn.modules import kernel_dims
from qalora_jax.quant import QTensor, Quantizer
from qalora_jax.tree_paths import flatten, set_path

# The seven linear layers of every block (QLoRA's and QA-LoRA's default); matched against layer paths.
ALL_LINEARS = r".*/(q|k|v|o|gate|up|down)_proj"


def linear_layers(tree: dict) -> Iterator[tuple[str, dict]]:
  """Yields ("/"-joined path, layer dict) for every dict in `tree` that holds a "kernel"."""
  for path, node in flatten(tree, is_leaf=lambda d: "kernel" in d):
    if isinstance(node, dict):
      yield path, node


def adapter_layers(adapters: dict) -> Iterator[tuple[str, Adapter]]:
  """Yields ("/"-joined layer path, Adapter) for every adapter in an adapter tree."""
  for path, leaf in flatten(adapters):
    layer, _, key = path.rpartition("/")
    if isinstance(leaf, Adapter) and key == "adapter":
      yield layer, leaf


def add_adapters(frozen: dict, method: str, *, rank: int, alpha: float, key: jax.Array,
                 targets: str = ALL_LINEARS, rslora: bool = False, dropout: float = 0.0,
                 dtype=jnp.float32) -> dict:
  """Builds the adapter tree for every linear layer whose path fully matches `targets`.

  method "lora": A [in, r] on any base; "qalora": A [ceil(in / g), r] pooled over the base QTensor's groups
  (the base must carry per-group offsets, see quant.has_group_offset).
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
  layers = list(linear_layers(frozen))
  chosen = [(path, layer) for path, layer in layers if re.fullmatch(targets, path)]
  if not chosen:
    names = ", ".join(path for path, _ in layers)
    raise ValueError(f"targets={targets!r} matches no linear layer; the layers are: {names}")
  adapters: dict = {}
  capped = []
  for path, layer in chosen:
    lead, n_in, n_out = kernel_dims(layer["kernel"])
    group = 0
    if method == "qalora":
      group = getattr(layer["kernel"], "group_size", 0)
      check_qalora_base(layer["kernel"], group, where=path)
    usable = min(-(-n_in // group) if group else n_in, n_out)
    if rank > usable:
      capped.append(f"{path} (effective rank {usable})")
    adapter = init_adapter(layer_key(key, path), method, n_in, n_out, rank, alpha=alpha, rslora=rslora,
                           group_size=group, dropout=dropout, lead=lead, dtype=dtype)
    set_path(adapters, path, {"adapter": adapter})
  if capped:
    warnings.warn(f"rank={rank} exceeds what these layers can use: {', '.join(capped)}", stacklevel=2)
  return adapters


def combine(frozen: dict, adapters: dict) -> dict:
  """Deep union of two trees with disjoint leaves (e.g. frozen and adapters): the model's parameters."""
  out = dict(frozen)
  for key, value in adapters.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = combine(out[key], value)
    elif key in out:
      raise ValueError(f"both trees hold a leaf at {key!r}")
    else:
      out[key] = value
  return out


def merge_params(frozen: dict, adapters: dict, requantize: Quantizer | None = None) -> dict:
  """Folds every adapter into its base kernel: a tree with no adapter leaves.

  QA-LoRA adapters go into the offsets of their QTensors (exact; the format and size are unchanged); LoRA
  adapters give float kernels, re-quantized with `requantize` when given.
  """
  merged = jax.tree.map(lambda x: x, frozen, is_leaf=lambda x: isinstance(x, QTensor))  # a fresh copy of the dicts
  layers = dict(linear_layers(frozen))
  for path, adapter in adapter_layers(adapters):
    if path not in layers:
      raise ValueError(f"{path}: an adapter for a layer the frozen tree does not have")
    set_path(merged, f"{path}/kernel", merge_adapter(layers[path]["kernel"], adapter, requantize))
  return merged


def adapter_ranks(adapters: dict) -> dict:
  """{"effective_rank": {layer kind: rank}, "free_params": n} of an adapter tree: the rank each kind of adapted
  layer can reach (`Adapter.effective_rank`; the smallest over layers of a kind, e.g. "attn/q_proj" over the
  blocks) and the trainable parameters that can move the updates (`Adapter.free_params`, summed)."""
  ranks, free = {}, 0
  for path, adapter in adapter_layers(adapters):
    kind = "/".join(part for part in path.split("/") if not part.isdigit() and part != "blocks")
    ranks[kind] = min(ranks.get(kind, adapter.effective_rank), adapter.effective_rank)
    free += adapter.free_params
  return {"effective_rank": dict(sorted(ranks.items())), "free_params": free}


def count_params(tree) -> int:
  """Number of scalars in the array leaves of a tree (Adapter leaves included)."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def tree_nbytes(tree) -> int:
  """Bytes of the array leaves of a tree (QTensors at their packed size)."""
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))
