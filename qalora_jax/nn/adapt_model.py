"""Bring your own Flax model: quantize and adapt any NNX model's linear layers by regex rules over module paths.

    rules = [nn.Rule(r".*/(q|k|v|o)_proj", quant.get("int", bits=4, group_size=32), "qalora", rank=16, alpha=32),
             nn.Rule(r".*/mlp/.*", quant.get("nf4"), "lora", rank=8)]
    model = nn.adapt(model, rules, key=jax.random.key(0))     # in place; returns the model
    graphdef, adapters, frozen = nnx.split(model, nn.AdapterParam, ...)
    ...train the adapters (functionally, or with nnx.Optimizer(model, tx, wrt=nn.AdapterParam))...
    nn.merge(model)           # QA-LoRA: into the offsets (still INT-k, same bytes); LoRA: float or re-quantized

Layers found (their "/"-joined module paths, e.g. "layers/0/attn/q_proj", are matched with re.fullmatch; the
first matching rule decides):
  - nnx.Linear                     kernel [in, out]
  - nnx.LinearGeneral              kernel [*in_features, *out_features], contracted over `axis`
  - nnx.Einsum, and any module holding an `einsum_str` and one nnx.Param kernel (as tunix's and Gemma's
    `Einsum`): the kernel's contracted axes flatten into `in`, its output axes into `out` (nn.EinsumLayout)
  - qalora_jax.nn.Linear           an already adapted layer (quantized again only if its kernel is float)
Each chosen layer is replaced by a qalora_jax.nn.Linear holding the [in, out] kernel (quantized by the rule's
quantizer, groups along the flattened `in`, i.e. along every contracted axis), the original bias Variable, and
the rule's adapter. The original layer's other plain attributes (e.g. `in_features`, `einsum_str`, `shape`) are
copied over, so code that reads them keeps working.

Quantizers that calibrate (GPTQ) get each layer's Hessian H = (2 / N) sum x x^T from the model's own forward
pass on `calibration` batches, true sequential (nn/calibrate.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from qalora_jax.nn.adapters import METHODS, layer_key
from qalora_jax.nn.calibrate import calibrate_sequential, call_model
from qalora_jax.nn.merge import check_qalora_base, merge_adapter
from qalora_jax.nn.modules import (AdapterParam, AxesLayout, EinsumLayout, Frozen, Linear, LowRankAdapter,
                                   adapted_layers, module_path)
from qalora_jax.nn.trees import count_params, tree_nbytes
from qalora_jax.quant import QTensor, Quantizer, quantize_stacked


@dataclasses.dataclass(frozen=True)
class Rule:
  """What to do with the layers whose module path fully matches `pattern`.

  Attributes:
    pattern: a regex over "/"-joined module paths (re.fullmatch).
    quantizer: a registered quantizer for the kernel (quant.get(...)), or None to keep it float.
    method: "lora", "qalora", or None (quantize only, no adapter).
    rank, alpha, dropout, rslora: the adapter's; s = alpha / r (alpha / sqrt(r) with rsLoRA).
    group_size: QA-LoRA's pooling group; None takes the quantizer's, any other value must equal it.
  """

  pattern: str
  quantizer: Quantizer | None = None
  method: str | None = None
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  rslora: bool = False
  group_size: int | None = None

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"Rule.pattern={self.pattern!r} is not supported; allowed: a regex string")
    re.compile(self.pattern)
    if self.method not in (None, *METHODS):
      raise ValueError(f"Rule.method={self.method!r} is not supported; allowed: None, {', '.join(METHODS)}")
    if self.quantizer is not None and not isinstance(self.quantizer, Quantizer):
      raise ValueError(f"Rule.quantizer={self.quantizer!r} is not supported; allowed: None or a quantizer "
                       f"from qalora_jax.quant.get(...)")
    if self.method == "qalora" and self.quantizer is None:
      raise ValueError(f"Rule({self.pattern!r}): method='qalora' needs a quantizer whose groups carry offsets "
                       f"(e.g. quant.get('int', bits=4, group_size=32)); got quantizer=None")


# ------------------------------------------------------------------------------------------- layers


def _einsum_kernel(module) -> nnx.Variable | None:
  """The single nnx.Param of an einsum-like module (an `einsum_str` attribute), else None."""
  if not isinstance(getattr(module, "einsum_str", None), str):
    return None
  params = [v for v in vars(module).values() if isinstance(v, nnx.Param)]
  return params[0] if len(params) == 1 else None


def is_linear_layer(module) -> bool:
  return isinstance(module, (Linear, nnx.Linear, nnx.LinearGeneral, nnx.Einsum)) or _einsum_kernel(module) is not None


def _layers(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
  """{"/"-joined module path: (graph path, layer)} for every linear layer `adapt` can take, in graph order."""
  return {module_path(path): (path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and path and is_linear_layer(node)}


def linear_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """("/"-joined module path, layer) for every linear layer `adapt` can take, in graph order."""
  return [(p, node) for p, (_, node) in _layers(model).items()]


_OWN = {"kernel", "bias", "adapter", "layout", "matmul_dtype", "capture"}


def _as_linear(layer, where: str) -> Linear:
  """A qalora_jax.nn.Linear computing what `layer` computes, with a float [in, out] kernel."""
  if isinstance(layer, Linear):
    return layer
  if isinstance(layer, nnx.Linear):
    out = Linear(layer.kernel.get_value(), layer.bias)
  elif isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis:
      raise ValueError(f"{where}: nnx.LinearGeneral with batch_axis={dict(layer.batch_axis)} is a batched "
                       f"product whose contraction the adapter cannot pool; allowed: batch_axis empty")
    axis = layer.axis if isinstance(layer.axis, tuple) else (layer.axis,)
    in_f = layer.in_features if isinstance(layer.in_features, tuple) else (layer.in_features,)
    out_f = layer.out_features if isinstance(layer.out_features, tuple) else (layer.out_features,)
    layout = AxesLayout(tuple(axis), tuple(in_f), tuple(out_f))
    out = Linear(layout.kernel_matrix(layer.kernel.get_value()), layer.bias, layout=layout)
  else:
    kernel = layer.kernel if isinstance(layer, nnx.Einsum) else _einsum_kernel(layer)
    layout = EinsumLayout.parse(layer.einsum_str, tuple(kernel.shape), where)
    out = Linear(layout.kernel_matrix(kernel.get_value()), getattr(layer, "bias", None) if
                 isinstance(layer, nnx.Einsum) else None, layout=layout)
  for name, value in vars(layer).items():  # plain attributes other code may read (in_features, shape, ...)
    if not name.startswith("_") and name not in _OWN and not isinstance(value, (nnx.Variable, nnx.Module)) \
        and not isinstance(value, jax.Array) and not callable(value) and not hasattr(Linear, name):
      try:
        setattr(out, name, value)
      except (ValueError, TypeError):
        pass
  return out


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
  key = path[-1]
  if isinstance(key, int) or not hasattr(parent, str(key)):
    parent[key] = new
  else:
    setattr(parent, key, new)


def quantize_kernel(quantizer: Quantizer, kernel, where: str, hessian=None) -> QTensor:
  """`kernel` quantized (with the Hessian of its inputs for a quantizer that calibrates); errors name `where`."""
  if isinstance(kernel, QTensor):
    return kernel
  try:
    if hessian is not None and quantizer.needs_calibration:
      return quantizer.quantize_with_hessian(jnp.asarray(kernel, jnp.float32), hessian)
    return quantize_stacked(quantizer, jnp.asarray(kernel, jnp.float32))
  except ValueError as e:
    raise ValueError(f"{where}: kernel [in, out] = {list(jnp.shape(kernel))[-2:]} is refused by {quantizer}: {e}") \
        from None


# -------------------------------------------------------------------------------------------- adapt


def adapt(model: nnx.Module, rules: Rule | Iterable[Rule], *, key: jax.Array | None = None,
          rngs: nnx.Rngs | None = None, calibration: Iterable | None = None,
          forward: Callable[[nnx.Module, Any], Any] | None = None) -> nnx.Module:
  """Quantizes and adapts the linear layers of `model` (in place) by `rules`; returns the model. The work is
  done on a clone and the new layers are put into `model` at the end, so an error leaves `model` unchanged.

  Args:
    model: any Flax NNX module.
    rules: Rule or list of Rules; the first whose pattern fully matches a layer's path decides; a rule that
      matches no layer is an error (the message lists the layer paths).
    key: PRNG key of the adapters' initialisation (default: PRNGKey(0)); rngs: an nnx.Rngs with a "dropout"
      stream for adapters with dropout > 0 (otherwise the caller passes dropout keys).
    calibration: batches for quantizers that calibrate (GPTQ); `forward(model, batch)` runs the model on one
      (default: model(batch)).
  """
  if _is_linen(model):
    raise ValueError("model is a flax.linen Module; allowed: a flax.nnx Module. adapt() replaces NNX layers "
                     "(nnx.Linear, nnx.LinearGeneral, nnx.Einsum), and a linen model wrapped by "
                     "nnx.bridge.ToNNX still runs linen's own Dense layers: port the model to flax.nnx")
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model of type {type(model).__name__} is not supported; allowed: a flax.nnx Module")
  rules = [rules] if isinstance(rules, Rule) else list(rules)
  for i, rule in enumerate(rules):
    if not isinstance(rule, Rule):
      raise ValueError(f"rules[{i}]={rule!r} is not supported; allowed: qalora_jax.nn.Rule(...)")
  work = nnx.clone(model)
  layers = _layers(work)
  chosen: dict[str, Rule] = {}
  for rule in rules:
    matched = [p for p in layers if re.fullmatch(rule.pattern, p)]
    if not matched:
      raise ValueError(f"Rule({rule.pattern!r}) matches no linear layer; the layers are: "
                       f"{', '.join(layers) or '(none)'}")
    for p in matched:
      chosen.setdefault(p, rule)
  for p, rule in chosen.items():
    base_group = getattr(rule.quantizer, "group_size", None)
    if rule.method == "qalora" and rule.group_size is not None and rule.group_size != base_group:
      raise ValueError(f"{p}: Rule.group_size={rule.group_size} differs from the base quantizer's group size "
                       f"{base_group}; QA-LoRA pools over the base's groups, allowed: {base_group} or None")

  linears = {}
  for p, rule in chosen.items():
    path, layer = layers[p]
    linear = _as_linear(layer, p)
    if rule.quantizer is not None and not isinstance(linear.kernel.get_value(), QTensor):
      _check_quantizable(rule.quantizer, linear, p)
    if linear is not layer:
      _replace(work, path, linear)
    linears[p] = linear

  calibrated = [p for p, r in chosen.items() if r.quantizer is not None and r.quantizer.needs_calibration]
  if calibrated:
    if calibration is None:
      raise ValueError(f"calibration=None, but {chosen[calibrated[0]].quantizer} on {calibrated[0]} calibrates; "
                       f"allowed: an iterable of batches (and forward=fn(model, batch) if model(batch) is not "
                       f"how the model runs)")
    calibrate_sequential(work, {p: linears[p] for p in calibrated}, list(calibration),
                         forward or call_model,
                         quantize=lambda p, h: _set_kernel(linears[p], quantize_kernel(
                             chosen[p].quantizer, linears[p].kernel.get_value(), p, h)))
  for p, rule in chosen.items():
    if rule.quantizer is not None and p not in calibrated:
      _set_kernel(linears[p], quantize_kernel(rule.quantizer, linears[p].kernel.get_value(), p))

  key = jax.random.PRNGKey(0) if key is None else key
  for p, rule in chosen.items():
    if rule.method is None:
      continue
    kernel = linears[p].kernel.get_value()
    if rule.method == "qalora":
      check_qalora_base(kernel, kernel.group_size, where=p)
    linears[p].adapter = LowRankAdapter.create(
        layer_key(key, p), rule.method, kernel, rank=rule.rank, alpha=rule.alpha, rslora=rule.rslora,
        dropout=rule.dropout, rngs=rngs)
  for p, linear in linears.items():
    _replace(model, layers[p][0], linear)
  return model


def _check_quantizable(quantizer: Quantizer, linear: Linear, where: str) -> None:
  shape = tuple(linear.kernel.get_value().shape[-2:])
  try:
    quantizer.check_shape(shape)
  except ValueError as e:
    raise ValueError(f"{where}: kernel [in, out] = {list(shape)} is refused by {quantizer}: {e}") from None


def _set_kernel(linear: Linear, kernel) -> None:
  linear.kernel = Frozen(kernel)


def _is_linen(model) -> bool:
  try:
    from flax import linen
  except ImportError:  # pragma: no cover - linen ships with flax
    return False
  return isinstance(model, linen.Module)


# -------------------------------------------------------------------------------------------- merge


def merge(model: nnx.Module, requantize: Quantizer | None = None) -> nnx.Module:
  """Folds every adapter of `model` into its kernel (in place; returns the model): QA-LoRA into the offsets
  of its QTensor (exact; same codes, format and bytes), LoRA into a float kernel W + s A B, re-quantized with
  `requantize` when given. The layers keep no adapter."""
  for _, layer in adapted_layers(model):
    if layer.adapter is None:
      continue
    layer.kernel = Frozen(merge_adapter(layer.kernel.get_value(), layer.adapter.as_pytree(), requantize))
    layer.adapter = None
  return model


def stats(model: nnx.Module) -> dict[str, int]:
  """Counts over a model's state: {"adapter_params", "adapter_bytes", "frozen_bytes", "other_bytes"}
  (QTensors at their packed size)."""
  adapters, frozen, other = nnx.state(model, AdapterParam, Frozen, ...)
  return {"adapter_params": count_params(adapters), "adapter_bytes": tree_nbytes(adapters),
          "frozen_bytes": tree_nbytes(frozen), "other_bytes": tree_nbytes(other)}
