"""Quantizing a model's parameters with any registered quantizer, the weights chosen by regex rules.

    frozen, summary = quantize_params(params, quant.get("int", bits=4, group_size=128))
    frozen, summary = quantize_params(params, [
        (r"blocks/mlp/.*/kernel", quant.get("int", bits=3, group_size=64)),
        (r"blocks/attn/.*/kernel", quant.get("nf4")),
        (r"lm_head/kernel", None),                                   # None: keep float
    ])

Rules are (pattern, quantizer or None) pairs matched in order with `re.fullmatch` against the "/"-joined
parameter paths of `llama.param_paths` ("blocks/attn/q_proj/kernel", "embed/embedding", "lm_head/kernel",
...); the first matching rule decides, and a path no rule matches stays float. A stacked block kernel
[L, in, out] is quantized layer by layer and the L QTensors are stacked into one (leaves get a leading L axis).
The token table embed/embedding [V, D] is quantized transposed, as a [D, V] QTensor (groups along D, one set of
scales per token), which the embedding lookup gathers columns of and a tied head multiplies as x W:

    frozen, _ = quantize_params(merged, [(BLOCK_LINEARS, None), ("embed/embedding", quant.get("int", bits=8))])
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax

from qalora_jax.files import atomic_file
from qalora_jax.tree_paths import flatten, unflatten
from qalora_jax.quant import QMeta, QTensor, Quantizer, get, quantize_stacked

# Every linear layer of the blocks; embeddings, the output head and the norms stay float.
BLOCK_LINEARS = r"blocks/(attn|mlp)/[a-z_]+_proj/kernel"

EMBEDDING = "embed/embedding"

Rule = tuple[str, Optional[Quantizer]]


@dataclasses.dataclass(frozen=True)
class RuleStats:
  pattern: str
  quantizer: str  # repr of the quantizer, "float" for a None rule
  tensors: int  # parameter leaves matched (a stacked kernel counts once)
  matrices: int  # [in, out] matrices quantized (a stacked kernel counts L)
  weights: int
  bytes_before: int
  bytes_after: int


@dataclasses.dataclass(frozen=True)
class QuantizeSummary:
  """What `quantize_params` did: total bytes before and after, and per-rule counts."""

  bytes_before: int
  bytes_after: int
  rules: tuple[RuleStats, ...]

  def __str__(self) -> str:
    lines = [f"{'rule':<36} {'quantizer':<48} {'tensors':>7} {'matrices':>8} {'MB before':>10} {'MB after':>9}"]
    for r in self.rules:
      lines.append(f"{r.pattern:<36} {r.quantizer[:48]:<48} {r.tensors:>7} {r.matrices:>8} "
                   f"{r.bytes_before / 1e6:>10.2f} {r.bytes_after / 1e6:>9.2f}")
    lines.append(f"{'total':<36} {'':<48} {'':>7} {'':>8} {self.bytes_before / 1e6:>10.2f} "
                 f"{self.bytes_after / 1e6:>9.2f}")
    return "\n".join(lines)


def nbytes(leaf) -> int:
  """Storage size of a parameter leaf (QTensor: its true packed size)."""
  if isinstance(leaf, QTensor):
    return leaf.nbytes
  return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


class QuantizationRules:
  """Applies quantization rules leaf by leaf, `leaf = q(path, leaf)`, and keeps the statistics for
  `summary()`. `quantize_params` runs it over a tree; `models.load(..., quantize=rules)` runs it on each
  weight as it is read, so that the float model is never whole in memory."""

  def __init__(self, rules: Quantizer | Sequence[Rule] | None):
    if rules is None or isinstance(rules, Quantizer):
      if rules is None:
        raise ValueError("rules=None is not supported; allowed: a quantizer, or a list of (regex, quantizer or None)")
      rules = [(BLOCK_LINEARS, rules)]
    self.rules = list(rules)
    for i, rule in enumerate(self.rules):
      if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)
              and (rule[1] is None or isinstance(rule[1], Quantizer))):
        raise ValueError(f"rules[{i}]={rule!r} is not supported; allowed: a (regex, quantizer or None) pair")
    self.compiled = [re.compile(pattern) for pattern, _ in self.rules]
    self.stats = [dict(tensors=0, matrices=0, weights=0, bytes_before=0, bytes_after=0) for _ in self.rules]
    self.bytes_before = self.bytes_after = 0
    self.paths: dict[str, None] = {}  # in the order seen
    self.kept: dict[int, str] = {}  # rule -> a quantized leaf it matched and kept as it is

  def __call__(self, path: str, leaf):
    """The leaf at `path` after the first matching rule (already-quantized leaves are kept as they are)."""
    first = path not in self.paths  # a loader passes a stacked leaf's layers one at a time
    self.paths[path] = None
    k = next((i for i, rx in enumerate(self.compiled) if rx.fullmatch(path)), None)
    if isinstance(leaf, QTensor):
      if k is not None:
        self.kept.setdefault(k, f"{path} ({leaf.format} {leaf.bits}-bit, group {leaf.group_size})")
      k = None
    out = leaf
    if k is not None:
      pattern, quantizer = self.rules[k]
      if quantizer is not None:
        if leaf.ndim not in (2, 3):
          raise ValueError(f"rule {pattern!r} matched {path} of shape {list(leaf.shape)}; allowed: kernels "
                           f"[in, out] or stacked [layers, in, out]")
        # The token table [V, D] is quantized as its transpose [D, V]: groups run along the model dimension, one
        # set of scales per token row (llama.cpp's Q8_0 rows), and the tied head is then a plain x W.
        out = quantize_stacked(quantizer, jnp.asarray(leaf).T if path == EMBEDDING else jnp.asarray(leaf))
      s = self.stats[k]
      s["tensors"] += first
      s["matrices"] += leaf.shape[0] if leaf.ndim == 3 else 1
      s["weights"] += int(np.prod(leaf.shape))
      s["bytes_before"] += nbytes(leaf)
      s["bytes_after"] += nbytes(out)
    self.bytes_before += nbytes(leaf)
    self.bytes_after += nbytes(out)
    return out

  def summary(self) -> QuantizeSummary:
    """The statistics; a rule that matched no leaf is an error."""
    for k, ((pattern, _), s) in enumerate(zip(self.rules, self.stats)):
      if s["tensors"] == 0 and k in self.kept:
        raise ValueError(f"rule {pattern!r} matches only weights that are quantized already, e.g. {self.kept[k]}; "
                         f"allowed: a model whose matched weights are float (quantizing codes again is lossy: "
                         f"dequantize them first if that is meant)")
      if s["tensors"] == 0:
        raise ValueError(f"rule {pattern!r} matches no parameter; paths look like: "
                         f"{', '.join(list(self.paths)[:4])}, ...")
    return QuantizeSummary(
        bytes_before=self.bytes_before, bytes_after=self.bytes_after,
        rules=tuple(RuleStats(pattern, "float" if q is None else repr(q), **s)
                    for (pattern, q), s in zip(self.rules, self.stats)))


def quantize_params(params: dict, rules: Quantizer | Sequence[Rule] | None = None) -> tuple[dict, QuantizeSummary]:
  """The frozen parameter tree (selected kernels as QTensors, the rest unchanged) and a summary.

  `rules` is a list of (regex, quantizer or None), or a single quantizer meaning [(BLOCK_LINEARS, quantizer)].
  A rule that matches no path, or matches a leaf that is not a matrix, is an error.
  """
  q = QuantizationRules(rules)
  leaves = {path: q(path, leaf) for path, leaf in flatten(params)}
  return unflatten(leaves), q.summary()


def int8_table(params: dict) -> dict:
  """`params` with a float token table (and so the tied head) stored as 8-bit codes per 32 inputs with float16
  scale and offset (llama.cpp's Q8_0 role: a quarter of float32's bytes); a table already quantized is kept."""
  if isinstance(params["embed"]["embedding"], QTensor):
    return params
  return quantize_params(params, [(EMBEDDING, get("int", bits=8, group_size=32))])[0]


def save_leaves(file: str | Path, leaves: dict) -> None:
  """Writes flat {path: leaf} to the safetensors file `file`: a QTensor as tensors "<path>/<array>" (its arrays
  as they are, dtype included, so that it loads back bit for bit) with its QMeta in the file's metadata
  ("qtensors", JSON), any other leaf as tensor "<path>". `load_leaves` reads it back."""
  tensors, metas = {}, {}
  for p, leaf in leaves.items():
    if isinstance(leaf, QTensor):
      metas[p] = dataclasses.asdict(leaf.meta)
      tensors.update({f"{p}/{name}": jnp.asarray(a) for name, a in leaf.arrays.items()})
    else:
      tensors[p] = jnp.asarray(leaf)
  safetensors.flax.save_file(tensors, str(file), metadata={"qtensors": json.dumps(metas)})


def load_leaves(file: str | Path) -> dict:
  """{path: QTensor or array} of a file `save_leaves` wrote."""
  with safetensors.safe_open(str(file), "flax") as f:
    metas = json.loads(f.metadata()["qtensors"])
    arrays = {name: f.get_tensor(name) for name in f.keys()}
  leaves = {}
  for p, m in metas.items():
    meta = QMeta(m["format"], tuple(m["shape"]), m["bits"], m["group_size"], tuple(tuple(o) for o in m["options"]))
    prefix = f"{p}/"
    leaves[p] = QTensor({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, meta)
  owned = {f"{p}/{name}" for p, leaf in leaves.items() for name in leaf.arrays}
  leaves.update({name: a for name, a in arrays.items() if name not in owned})
  return leaves


def save_quantized(path: str | Path, frozen: dict) -> None:
  """Writes the QTensor leaves of a frozen tree to one safetensors file (`save_leaves`), atomically. Float
  leaves are not saved: `load_quantized` takes them from the float parameters."""
  with atomic_file(path) as tmp:
    save_leaves(tmp, {p: leaf for p, leaf in flatten(frozen) if isinstance(leaf, QTensor)})


def load_quantized(path: str | Path, params: dict) -> dict:
  """The frozen tree: `params` with the QTensors of a `save_quantized` file in place of their float leaves."""
  leaves = dict(flatten(params))
  for p, qt in load_leaves(path).items():
    if p not in leaves:
      raise ValueError(f"{path}: quantized leaf {p} is not a parameter of this model")
    leaves[p] = qt
  return unflatten(leaves)
