"""QTensor: a quantized [in, out] weight as a pytree of arrays plus static metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class QMeta:
  """Static description of a QTensor; hashable, so it is part of the treedef and of jit's cache key.

  Attributes:
    format: name of the registered quantizer whose `dequantize` decodes the arrays (a quantizer may emit
      another one's format, as GPTQ emits `int`).
    shape: the [in, out] shape of the float weight.
    bits: bits per code.
    group_size: inputs per group (or block) sharing one set of parameters; groups run along `in`.
    options: format-specific settings as sorted (name, value) pairs, e.g. (("symmetric", False),).
  """

  format: str
  shape: tuple[int, int]
  bits: int
  group_size: int
  options: tuple[tuple[str, Any], ...] = ()

  def option(self, name: str, default: Any = None) -> Any:
    return dict(self.options).get(name, default)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class QTensor:
  """A quantized weight: `arrays` are the pytree leaves (packed codes, scales, offsets, ...), `meta` is
  static. `dequantize(dtype)` returns the [in, out] float weight; `nbytes` is the true storage size."""

  arrays: Mapping[str, jax.Array]
  meta: QMeta

  def tree_flatten_with_keys(self):
    keys = sorted(self.arrays)
    return [(jax.tree_util.DictKey(k), self.arrays[k]) for k in keys], (tuple(keys), self.meta)

  @classmethod
  def tree_unflatten(cls, aux, leaves):
    keys, meta = aux
    return cls(dict(zip(keys, leaves)), meta)

  def __getitem__(self, name: str) -> jax.Array:
    return self.arrays[name]

  @property
  def shape(self) -> tuple[int, int]:
    return self.meta.shape

  @property
  def format(self) -> str:
    return self.meta.format

  @property
  def bits(self) -> int:
    return self.meta.bits

  @property
  def group_size(self) -> int:
    return self.meta.group_size

  @property
  def nbytes(self) -> int:
    """Storage size in bytes: the sum of the array leaves' sizes."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in self.arrays.values())

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.nbytes / (self.shape[0] * self.shape[1])

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight [..., in, out]; leading axes (e.g. stacked layers) are mapped over."""
    from qalora_jax.quant import registry  # the registry imports this module

    decode = registry.quantizer_class(self.meta.format).dequantize
    fn = lambda qt: decode(qt, dtype)  # noqa: E731
    for _ in range(self.arrays["codes"].ndim - 2):
      fn = jax.vmap(fn)
    return fn(self)

  def column_wise(self) -> bool:
    """Whether every array ends in the `out` axis (one set of codes, scales and offsets per column, as the "int"
    format's), so that `columns` and `column_range` can take columns apart."""
    return all(a.ndim and a.shape[-1] == self.shape[1] for a in self.arrays.values())

  def columns(self, index: jax.Array) -> "QTensor":
    """Columns `index` [n] of the weight (a gather) as a QTensor [in, n]; needs `column_wise`."""
    return self._with_columns({k: jnp.take(a, index, axis=-1) for k, a in self.arrays.items()}, index.size)

  def column_range(self, start, size: int) -> "QTensor":
    """The `size` columns from `start` (which may be traced) as a QTensor [in, size]; needs `column_wise`."""
    return self._with_columns(
        {k: jax.lax.dynamic_slice_in_dim(a, start, size, a.ndim - 1) for k, a in self.arrays.items()}, size)

  @staticmethod
  def columns_alike(tensors: list["QTensor"]) -> bool:
    """Whether `concat_columns` takes these: `column_wise` weights with one `in`, format, bits, group size and
    options, and the same arrays in the same dtypes."""
    first = tensors[0]

    def layout(t):
      return {k: (a.dtype, a.shape[:-1]) for k, a in t.arrays.items()}

    return all(dataclasses.replace(t.meta, shape=first.shape) == first.meta and t.shape[0] == first.shape[0]
               and layout(t) == layout(first) and t.column_wise() for t in tensors)

  @staticmethod
  def concat_columns(tensors: list["QTensor"]) -> "QTensor":
    """The weights [in, out_1], ..., [in, out_n] side by side as one QTensor [in, out_1 + ... + out_n]; they must
    be `columns_alike`."""
    if not QTensor.columns_alike(tensors):
      raise ValueError("concat_columns needs column-wise QTensors alike but for their output sizes; got "
                       + ", ".join(map(repr, tensors)))
    arrays = {k: jnp.concatenate([t.arrays[k] for t in tensors], axis=-1) for k in tensors[0].arrays}
    return tensors[0]._with_columns(arrays, sum(t.shape[1] for t in tensors))

  def _with_columns(self, arrays: dict, n: int) -> "QTensor":
    return QTensor(arrays, dataclasses.replace(self.meta, shape=(self.shape[0], n)))

  def __repr__(self) -> str:
    arrays = ", ".join(f"{k}={a.dtype}{list(a.shape)}" for k, a in sorted(self.arrays.items()))
    return (f"QTensor({self.meta.format}, shape={list(self.shape)}, bits={self.bits}, "
            f"group_size={self.group_size}, {arrays})")
