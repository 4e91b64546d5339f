"""PEFT adapter directories: adapter_config.json + adapter_model.safetensors.

Layout (PEFT's, for a LLaMA-family model): torch Linear weights are [out, in], so for layer i

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight = A_i^T   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight = B_i^T   [out, r]

and the MLP's gate/up/down_proj under `.mlp.`. The scale is written as lora_alpha = s * r (use_rslora
false), which PEFT turns back into s.

QA-LoRA adapters use PEFT's `use_qalora` convention: PEFT pools with the group mean times (in // g),
qalora-jax with the group sum (nn/adapters.py), so PEFT's A is ours times g / (in // g). PEFT requires g
to divide `in`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qalora_jax.files import atomic_dir
from qalora_jax.nn.modules import adapted_layers
from qalora_jax.nn.modules import kernel_dims
from qalora_jax.nn.trees import adapter_layers, linear_layers
from qalora_jax.nn.adapters import Adapter, AdapterMeta
from qalora_jax.tree_paths import set_path

# Our block paths -> PEFT module names.
MODULES = {"blocks/attn/q_proj": "self_attn.q_proj", "blocks/attn/k_proj": "self_attn.k_proj",
           "blocks/attn/v_proj": "self_attn.v_proj", "blocks/attn/o_proj": "self_attn.o_proj",
           "blocks/mlp/gate_proj": "mlp.gate_proj", "blocks/mlp/up_proj": "mlp.up_proj",
           "blocks/mlp/down_proj": "mlp.down_proj"}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def _peft_a_factor(meta: AdapterMeta) -> float:
  """PEFT's A over ours: 1 for LoRA; g / (in // g) for QA-LoRA (sum pooling vs mean times in // g)."""
  if meta.kind != "qalora":
    return 1.0
  return meta.group_size / (meta.n_in // meta.group_size)


def export_peft(adapters: dict, out_dir: str | Path, *, base_model: str = "", overwrite: bool = False) -> Path:
  """Writes `adapters` (stacked over the blocks) as a PEFT adapter directory; returns its path."""
  layers = []
  for path, adapter in adapter_layers(adapters):
    if path not in MODULES:
      raise ValueError(f"{path}: PEFT export covers the block linears only ({', '.join(MODULES)})")
    for i in range(adapter.a.shape[0]):
      layers.append((f"model.layers.{i}.{MODULES[path]}", path, jax.tree.map(lambda x: x[i], adapter)))
  return write_peft(layers, out_dir, base_model=base_model, overwrite=overwrite)


def export_peft_model(model, out_dir: str | Path, *, module_name: Callable[[str], str] | None = None,
                      base_model: str = "", overwrite: bool = False) -> Path:
  """Writes the adapters of a Flax NNX model (adapted with `qalora_jax.adapt`) as a PEFT adapter directory.

  `module_name(path)` gives the PEFT (PyTorch) module name of the layer at our module path, e.g.
  "layers/3/attn/q_proj" -> "model.layers.3.self_attn.q_proj" (default: the path with "/" -> "."). A layer
  with several contracted or output axes (an einsum) is written as the torch Linear [out, in] of its
  flattened [in, out] matrix, which is what Hugging Face's projections are."""
  module_name = module_name or (lambda path: path.replace("/", "."))
  layers = []
  for path, layer in adapted_layers(model):
    if layer.adapter is None:
      continue
    adapter = layer.adapter.as_pytree()
    if adapter.a.ndim != 2:
      raise ValueError(f"{path}: adapters stacked over {list(adapter.a.shape[:-2])} layers; export_peft_model "
                       f"writes one adapter per module")
    layers.append((module_name(path), path, adapter))
  return write_peft(layers, out_dir, base_model=base_model, overwrite=overwrite)


def write_peft(layers: list[tuple[str, str, Adapter]], out_dir: str | Path, *, base_model: str = "",
               overwrite: bool = False) -> Path:
  """Writes (PEFT module name, our path, one layer's Adapter) triples as a PEFT adapter directory, atomically:
  lora_A.weight = A^T [r, in] (times PEFT's pooling constant for QA-LoRA), lora_B.weight = B^T [out, r]."""
  tensors, metas, ranks = {}, {}, set()
  for name, path, adapter in layers:
    meta = adapter.meta
    if meta.kind == "qalora" and meta.n_in % meta.group_size:
      raise ValueError(f"{path}: PEFT's use_qalora needs the group size {meta.group_size} to divide "
                       f"the input size {meta.n_in}")
    metas[name] = meta
    ranks.add(adapter.rank)
    prefix = f"base_model.model.{name}"
    tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter.a, np.float32).T
                                                              * _peft_a_factor(meta))
    tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter.b, np.float32).T)
  if not metas:
    raise ValueError("no adapters to export")
  kinds = {(m.kind, m.scale, m.group_size, m.dropout) for m in metas.values()}
  if len(kinds) != 1 or len(ranks) != 1:
    raise ValueError("PEFT stores one rank, scale and method for all layers; these adapters differ")
  kind, scale, group, dropout = kinds.pop()
  rank = ranks.pop()
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "r": rank, "lora_alpha": scale * rank, "lora_dropout": dropout, "use_rslora": False,
      "target_modules": sorted({name.split(".")[-1] for name in metas}), "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
      "use_qalora": kind == "qalora", "qalora_group_size": group if kind == "qalora" else 16,
  }
  with atomic_dir(out_dir, overwrite=overwrite) as tmp:
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return Path(out_dir)


def import_peft(adapter_dir: str | Path, frozen: dict, *, dtype=jnp.float32) -> dict:
  """Reads a PEFT LoRA (or use_qalora) adapter directory into an adapter tree for `frozen`.

  Shapes are checked against the frozen kernels; a mismatch names the layer."""
  adapter_dir = Path(adapter_dir)
  config = json.loads((adapter_dir / "adapter_config.json").read_text())
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{adapter_dir}: peft_type={config.get('peft_type')!r} is not supported; allowed: LORA")
  tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
  rank, alpha = int(config["r"]), float(config["lora_alpha"])
  scale = alpha / np.sqrt(rank) if config.get("use_rslora") else alpha / rank
  qalora = bool(config.get("use_qalora"))
  group = int(config.get("qalora_group_size", 0)) if qalora else 0
  found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for key, value in tensors.items():
    m = _KEY.fullmatch(key.replace(".default.", "."))
    if not m:
      raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} (expected PEFT LoRA keys of a LLaMA model)")
    layer, part, module, ab = m.groups()
    path = next((p for p, name in MODULES.items() if name == f"{part}.{module}"), None)
    if path is None:
      raise ValueError(f"{adapter_dir}: unknown module {part}.{module} in {key!r}")
    found.setdefault(path, {}).setdefault(int(layer), {})[ab] = value
  kernels = dict(linear_layers(frozen))
  adapters: dict = {}
  for path, by_layer in sorted(found.items()):
    if path not in kernels:
      per_layer = any(re.match(r"blocks/\d+/", p) for p in kernels)
      raise ValueError(f"{path}: " + ("the tree's blocks are per layer (blocks/0/...); import into the stacked tree "
                                      "(models.llama.stack_blocks)" if per_layer else
                                      "the adapter has weights for a layer the model does not have"))
    lead, n_in, n_out = kernel_dims(kernels[path]["kernel"])
    n_layers = lead[0] if lead else 1
    if sorted(by_layer) != list(range(n_layers)):
      raise ValueError(f"{path}: adapter covers layers {sorted(by_layer)[:5]}..., the model has {n_layers}")
    a_in = n_in // group if qalora else n_in
    meta = AdapterMeta("qalora" if qalora else "lora", float(scale), group, n_in,
                       float(config.get("lora_dropout", 0.0)))
    a_list, b_list = [], []
    for i in range(n_layers):
      a, b = by_layer[i]["A"], by_layer[i]["B"]
      if a.shape != (rank, a_in) or b.shape != (n_out, rank):
        raise ValueError(f"{path} layer {i}: adapter shapes lora_A {a.shape}, lora_B {b.shape} do not match "
                         f"the model's ({rank}, {a_in}) and ({n_out}, {rank})")
      a_list.append(a.T / _peft_a_factor(meta))
      b_list.append(b.T)
    adapter = Adapter(jnp.asarray(np.stack(a_list), dtype), jnp.asarray(np.stack(b_list), dtype), meta)
    set_path(adapters, f"{path}/adapter", adapter)
  return adapters
