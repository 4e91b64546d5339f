"""Flax NNX layers: a linear layer over a frozen (float or quantized) kernel, with an optional low-rank adapter.

    layer = nn.Linear(quant.get("int", bits=4, group_size=32).quantize(w))    # kernel [in, out] in a Frozen
    layer.adapter = nn.LowRankAdapter.create(key, "qalora", layer.kernel.value, rank=16, alpha=32)
    y = layer(x)                                                  # x W~ + b + s (pool(x) A) B

Two Variable types split every adapted model in two:

  Frozen          the base: float kernels and QTensors (and, in the decoders here, norms and embeddings). Not an
                  nnx.Param, so no `Param` filter, optimizer or gradient ever touches it.
  AdapterParam    A and B; a subclass of nnx.LoRAParam, so code written for `wrt=nnx.LoRAParam` (Flax's
                  optimization cookbook, tunix) trains them.

    graphdef, adapters, frozen = nnx.split(model, nn.AdapterParam, ...)
    loss = lambda adapters: loss_fn(nnx.merge(graphdef, adapters, frozen), batch)     # pure in both states

The adapter's description (`AdapterMeta`: kind, scale, group size, input size, dropout) is metadata of both of
its Variables, so it travels with any nnx.State holding them: merging and exporting never need it passed again.
The arithmetic is the functional core's (nn/linear.py, nn/adapters.py): the hand-written VJPs, the CPU kernel,
the dequantization; one forward for every method.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qalora_jax.nn.adapters import Adapter, AdapterMeta, init_adapter
from qalora_jax.nn.linear import linear, shared_folded
from qalora_jax.quant import QTensor


class Frozen(nnx.Variable):
  """A frozen base parameter (a float array or a QTensor): never differentiated, never optimized."""


class AdapterParam(nnx.LoRAParam):
  """A trainable low-rank factor (A or B); metadata `adapter_meta` describes the adapter it belongs to."""


class LowRankAdapter(nnx.Module):
  """The factors of the adapter branch s * (pool(dropout(x)) A) B (see nn/adapters.py), which nn.Linear adds:
  A [..., in or ceil(in / g), r] and B [..., r, out] in AdapterParam Variables; leading axes count stacked
  layers.

  Dropout (rate meta.dropout) needs a key: the caller's `dropout_rng`, or else this module's own `rngs`
  stream (given at creation, as nnx.Dropout does) while the module is not `deterministic` (nnx's
  model.eval() / model.train() switch it)."""

  def __init__(self, a: jax.Array, b: jax.Array, meta: AdapterMeta, *, rngs: nnx.Rngs | None = None):
    self.a = AdapterParam(a, adapter_meta=meta)
    self.b = AdapterParam(b, adapter_meta=meta)
    self.rngs = nnx.data(rngs.fork() if rngs is not None and meta.dropout > 0 else None)
    self.deterministic = False

  @classmethod
  def create(cls, key: jax.Array, kind: str, kernel, *, rank: int, alpha: float, rslora: bool = False,
             dropout: float = 0.0, dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> LowRankAdapter:
    """A fresh adapter for `kernel` (float [..., in, out] or a QTensor): PEFT's init, A ~ U(+-1/sqrt(n)),
    B = 0; QA-LoRA pools over the kernel's quantization groups."""
    lead, n_in, n_out = kernel_dims(kernel)
    group = getattr(kernel, "group_size", 0) if kind == "qalora" else 0
    pytree = init_adapter(key, kind, n_in, n_out, rank, alpha=alpha, rslora=rslora, group_size=group,
                          dropout=dropout, lead=lead, dtype=dtype)
    return cls(pytree.a, pytree.b, pytree.meta, rngs=rngs)

  @property
  def meta(self) -> AdapterMeta:
    return self.a.get_metadata()["adapter_meta"]

  @property
  def rank(self) -> int:
    return self.b.shape[-2]

  def as_pytree(self) -> Adapter:
    """The functional core's Adapter(a, b, meta), on this module's current values."""
    return Adapter(self.a.get_value(), self.b.get_value(), self.meta)

  def dropout_key(self, dropout_rng: jax.Array | None) -> jax.Array | None:
    """The caller's key, else one from this module's own stream while it is not deterministic."""
    if dropout_rng is None and self.rngs is not None and not self.deterministic:
      return self.rngs.dropout()
    return dropout_rng


def kernel_dims(kernel) -> tuple[tuple[int, ...], int, int]:
  """(leading axes, in, out) of a float kernel [..., in, out] or a (possibly stacked) QTensor."""
  if isinstance(kernel, QTensor):
    return tuple(kernel["codes"].shape[:-2]), kernel.shape[0], kernel.shape[1]
  return tuple(kernel.shape[:-2]), kernel.shape[-2], kernel.shape[-1]


# ------------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class EinsumLayout:
  """How a layer y = einsum(equation, x, K) becomes y = x' W with W [in, out]: the kernel's contracted axes
  (in the kernel's order) flatten into `in`, its output axes into `out`.

      x' = x with the contracted axes moved last and flattened     [free..., in]
      y  = (x' W).reshape(free..., out axes), moved into the equation's output order

  Quantization groups and QA-LoRA's pooling run along that flattened `in` (every contracted axis, not only the
  last one). A kernel axis shared by input and output (a batched product) cannot be pooled and is refused.
  """

  equation: str  # "lhs,rhs->out" with single-letter axes; lhs may start with "..."
  contracted: str  # kernel letters summed over, in the kernel's order
  produced: str  # kernel letters of the output, in the kernel's order
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @classmethod
  def parse(cls, equation: str, kernel_shape: tuple[int, ...], where: str = "layer") -> EinsumLayout:
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
      raise ValueError(f"{where}: einsum {equation!r} is not supported; allowed: 'x_axes,kernel_axes->out_axes'")
    inputs, out = eq.split("->")
    lhs, rhs = inputs.split(",")
    if "." in rhs or len(set(rhs)) != len(rhs) or len(rhs) != len(kernel_shape):
      raise ValueError(f"{where}: einsum {equation!r} does not describe a kernel of shape {list(kernel_shape)}; "
                       f"allowed: one distinct letter per kernel axis, no '...'")
    shared = [c for c in rhs if c in lhs and c in out]
    if shared:
      raise ValueError(f"{where}: einsum {equation!r} keeps kernel axis {shared[0]!r} in both input and output "
                       f"(a batched product) whose contraction the adapter cannot pool; allowed: every kernel "
                       f"axis either contracted with the input or produced in the output")
    contracted = "".join(c for c in rhs if c in lhs)
    produced = "".join(c for c in rhs if c in out)
    stray = [c for c in rhs if c not in lhs and c not in out]
    free = lhs.replace("...", "")
    if stray or not contracted or any(c not in out for c in free if c not in contracted) or \
        sorted(out.replace("...", "")) != sorted([c for c in free if c not in contracted] + list(produced)):
      raise ValueError(f"{where}: einsum {equation!r} is not a linear map of the input's last axes; allowed: "
                       f"kernel axes each contracted with the input or produced in the output, every other "
                       f"input axis kept in the output")
    size = dict(zip(rhs, kernel_shape))
    return cls(eq, contracted, produced, tuple(size[c] for c in contracted), tuple(size[c] for c in produced))

  @property
  def _parts(self) -> tuple[str, str, str]:
    inputs, out = self.equation.split("->")
    lhs, _ = inputs.split(",")
    free = "".join(c for c in lhs.replace("...", "") if c not in self.contracted)
    return lhs, ("..." if "..." in lhs else "") + free, out

  def kernel_matrix(self, kernel: jax.Array) -> jax.Array:
    """The kernel as W [in, out]."""
    rhs = self.equation.split("->")[0].split(",")[1]
    w = jnp.einsum(f"{rhs}->{self.contracted}{self.produced}", kernel)
    return w.reshape(math.prod(self.in_shape), math.prod(self.out_shape))

  def flatten_input(self, x: jax.Array) -> jax.Array:
    lhs, free, _ = self._parts
    x = jnp.einsum(f"{lhs}->{free}{self.contracted}", x)
    return x.reshape(x.shape[:x.ndim - len(self.contracted)] + (math.prod(self.in_shape),))

  def unflatten_output(self, y: jax.Array) -> jax.Array:
    _, free, out = self._parts
    y = y.reshape(y.shape[:-1] + self.out_shape)
    return jnp.einsum(f"{free}{self.produced}->{out}", y)


@dataclasses.dataclass(frozen=True)
class AxesLayout:
  """nnx.LinearGeneral's layout: the input axes `axis` (in the kernel's order) contract with the kernel's first
  len(axis) axes, its other axes are the output's last ones. Flattened as in EinsumLayout."""

  axis: tuple[int, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  def kernel_matrix(self, kernel: jax.Array) -> jax.Array:
    return kernel.reshape(math.prod(self.in_shape), math.prod(self.out_shape))

  def flatten_input(self, x: jax.Array) -> jax.Array:
    axes = [a % x.ndim for a in self.axis]
    x = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
    return x.reshape(x.shape[:x.ndim - len(axes)] + (math.prod(self.in_shape),))

  def unflatten_output(self, y: jax.Array) -> jax.Array:
    return y.reshape(y.shape[:-1] + self.out_shape)


# -------------------------------------------------------------------------------------------- Linear


class Linear(nnx.Module):
  """y = x W + b + s (pool(x) A) B, with W [in, out] a float kernel or a QTensor (a Frozen Variable), b an
  optional bias Variable (added to the output), and an optional LowRankAdapter.

  `layout` (EinsumLayout / AxesLayout) maps a layer whose kernel has several axes (an einsum or a
  LinearGeneral) onto that [in, out] product; None: x [..., in]. `matmul_dtype` is the operand dtype of x W
  (see nn.linear.base_matmul). While `capture` holds a callable, every call reports (layer, x', original x)
  to it: calibration reads each layer's inputs from the model's own forward pass that way.
  """

  def __init__(self, kernel, bias=None, *, adapter: LowRankAdapter | None = None, layout=None,
               matmul_dtype: str | None = None):
    self.kernel = kernel if isinstance(kernel, nnx.Variable) else Frozen(kernel)
    self.bias = nnx.data(bias if bias is None or isinstance(bias, nnx.Variable) else Frozen(bias))
    self.adapter = nnx.data(adapter)
    self.layout = layout
    self.matmul_dtype = matmul_dtype
    self.capture: Callable | None = None

  @property
  def dims(self) -> tuple[tuple[int, ...], int, int]:
    """(leading axes, in, out) of the kernel."""
    return kernel_dims(self.kernel.get_value())

  def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    flat = x if self.layout is None else self.layout.flatten_input(x)
    if self.capture is not None:
      self.capture(self, flat, x)
    adapter = None
    if self.adapter is not None:
      adapter, dropout_rng = self.adapter.as_pytree(), self.adapter.dropout_key(dropout_rng)
    bias = None if self.bias is None else self.bias.get_value()
    p = {"kernel": self.kernel.get_value(), "bias": bias if self.layout is None else None, "adapter": adapter}
    y = linear(flat, p, dropout_rng=dropout_rng, matmul_dtype=self.matmul_dtype)
    if self.layout is None:
      return y
    y = self.layout.unflatten_output(y)  # an einsum's bias has the output's shape
    return y if bias is None else y + bias.astype(y.dtype)


def shared_input(x: jax.Array, layers: list[Linear], rngs: list) -> list[jax.Array]:
  """[layer(x) for layer in layers]: Linears that read the same x (q/k/v, gate/up). With matmul_dtype "int8" and
  INT4/INT8 bases the kernel takes together and no adapters, one CPU kernel call multiplies them all
  (kernels.cpu_matmul.matmul_shared): x is quantized once, and the call's columns are shared between threads.
  QA-LoRA adapters that fold into alike INT4 bases (float32 operands) run as one folded product
  (nn.linear.shared_folded)."""
  from qalora_jax.kernels import cpu_matmul

  kernels = [layer.kernel.get_value() for layer in layers]
  # QA-LoRA folded into the offsets (nn.linear.shared_folded); adapters without dropout draw no keys
  if all(layer.adapter is not None and layer.adapter.meta.dropout == 0 and layer.layout is None
         and layer.capture is None and layer.matmul_dtype == layers[0].matmul_dtype for layer in layers):
    ps = [{"kernel": k, "bias": None if layer.bias is None else layer.bias.get_value(),
           "adapter": layer.adapter.as_pytree()} for layer, k in zip(layers, kernels)]
    outs = shared_folded(x, ps, [None] * len(layers), layers[0].matmul_dtype)
    if outs is not None:
      return outs
  fusable = all(layer.matmul_dtype == "int8" and layer.adapter is None and layer.layout is None
                and layer.capture is None and cpu_matmul.supports(k) for layer, k in zip(layers, kernels))
  if not fusable or not cpu_matmul.compatible(kernels):
    return [layer(x, dropout_rng=rng) for layer, rng in zip(layers, rngs)]
  outs = cpu_matmul.matmul_shared(x, kernels)
  return [out if layer.bias is None else out + layer.bias.get_value().astype(out.dtype)
          for layer, out in zip(layers, outs)]


def module_path(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def adapted_layers(model: nnx.Module) -> list[tuple[str, Linear]]:
  """("/"-joined module path, qalora_jax.nn.Linear) for every layer of `model` that is ours."""
  return [(module_path(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, Linear) and path]
