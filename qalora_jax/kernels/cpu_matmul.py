"""y = x W~ on the CPU for an INT4 or INT8 group-wise QTensor, reading the packed codes: the decoding kernel.

Batch-1 decoding is memory-bound, and XLA's CPU backend has a fast matrix-vector product only for float32
operands: left to itself it dequantizes every weight to float32 (hoisting that out of the decoding loop, so
it reads 4 bytes a weight). This kernel reads the packed codes (half a byte or a byte a weight) and multiplies
them with int8 activations: each row of x is quantized to int8 per block b of 16 inputs (x_i ~ a_b xq_i,
a_b = max |x_i| / 127 over the block; a group whose size 16 does not divide is one block), and

    y_o = sum_g ( scale[g, o] sum_{b in g} a_b sum_{i in b} xq_i q[i, o] + offset[g, o] sum_{i in g} x_i )

the inner sums being AVX512-VNNI byte dot products (cpu_matmul.cc); rows go eight at a time through one pass
over the codes (a prompt reads the weights once per eight tokens, from the L1 cache), one call may multiply
several weights that read the same x (`matmul_shared`), and a wide call's columns, or a long prompt's, are
computed in two halves, the second on XLA's own intra-op thread pool. It is what `matmul_dtype="int8"` selects
(models.Config); `reference` is the same arithmetic in plain JAX, which the tests hold the kernel to.

llama.cpp quantizes activations per 32 inputs (its Q8 blocks). Blocks of 16 cost about a third less perplexity
for the same speed (experiments/perf/perf_vs_peers.md gives the int8 path's perplexity against float matmuls);
blocks of 8 would cost less again, and about a fifth of the decoding speed.

The kernel reads the weights in strips of 16 output columns (`Strips`), each strip's codes one contiguous run
of memory (decoding runs about 10% faster so than reading a QTensor's [in / 8, out] rows 16 columns at a time).
`prepare` lays a whole parameter tree out so, once, when a model is loaded for decoding; a QTensor handed to
`matmul` as it is gets laid out inside the computation, on every call.

The C++ is compiled for this machine on first use (kernels.cpu_library); where it cannot be, `supports` is False
and callers fall back to float matmuls.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.kernels.cpu_library import available
from qalora_jax.quant import QMeta, QTensor, packing

TARGETS = {np.dtype(np.float32): "qalora_cpu_matmul_f32", np.dtype(np.float16): "qalora_cpu_matmul_f16"}


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Strips:
  """An INT4 or INT8 "int" QTensor laid out for the kernel: 16 output columns a strip, codes
  [..., out / 16, in / (32 / bits), 16], scale and offset [..., out / 16, groups, 16] (a symmetric tensor's
  offset -2^(k-1) scale written out), `meta` the QTensor's. `qtensor()` gives the QTensor back."""

  codes: jax.Array
  scale: jax.Array
  offset: jax.Array
  meta: QMeta

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.GetAttrKey(k), a) for k, a in self.arrays.items()], self.meta

  @classmethod
  def tree_unflatten(cls, meta, leaves):
    return cls(*leaves, meta)

  @property
  def shape(self) -> tuple[int, int]:
    return self.meta.shape

  @property
  def arrays(self) -> dict[str, jax.Array]:
    return {"codes": self.codes, "scale": self.scale, "offset": self.offset}

  def qtensor(self) -> QTensor:
    """The same weight as a QTensor ([..., rows, out] arrays)."""
    return QTensor({k: _unstrip(a) for k, a in self.arrays.items()}, self.meta)

  def columns(self, index: jax.Array) -> QTensor:
    """Columns `index` [n] of the weight as a QTensor of shape [in, n] (a quantized token table's rows)."""
    return QTensor({k: a[index // 16, :, index % 16].T for k, a in self.arrays.items()},
                   dataclasses.replace(self.meta, shape=(self.shape[0], index.size)))


def _strip(a: jax.Array) -> jax.Array:
  """[..., n, out] -> [..., out / 16, n, 16]."""
  return jnp.swapaxes(a.reshape(*a.shape[:-1], a.shape[-1] // 16, 16), -3, -2)


def _unstrip(a: jax.Array) -> jax.Array:
  """[..., out / 16, n, 16] -> [..., n, out]."""
  a = jnp.swapaxes(a, -3, -2)
  return a.reshape(*a.shape[:-2], a.shape[-2] * 16)


def strips(qt: QTensor) -> Strips:
  """`qt` (`shape_ok`) in the kernel's layout."""
  scale, offset = _scales(qt)
  return Strips(_strip(qt["codes"]), _strip(scale), _strip(offset), qt.meta)


def prepare(tree):
  """`tree` with every QTensor the kernel reads (`shape_ok`) as `Strips`, where the kernel runs (else as it
  is). Decoding calls this once per model, so that no call of the model lays its weights out again."""
  if not available():
    return tree
  return jax.tree.map(lambda leaf: strips(leaf) if shape_ok(leaf) else leaf, tree,
                      is_leaf=lambda leaf: isinstance(leaf, QTensor))


def shape_ok(qt) -> bool:
  """Whether the kernel reads `qt`: an INT4 or INT8 "int" QTensor whose groups are whole words and divide `in`,
  and `out` a multiple of 16 (with any leading axes, e.g. stacked layers)."""
  if not (isinstance(qt, QTensor) and qt.format == "int" and qt.bits in (4, 8)):
    return False
  n_in, n_out = qt.shape
  return qt.group_size % (32 // qt.bits) == 0 and n_in % qt.group_size == 0 and n_out % 16 == 0


def supports(kernel) -> bool:
  """Whether `matmul(x, kernel)` runs the kernel (else use float matmuls): a 2-D weight it reads."""
  if isinstance(kernel, Strips):
    return kernel.codes.ndim == 3 and available()
  return shape_ok(kernel) and kernel["codes"].ndim == 2 and available()


def _scales(qt: QTensor):
  """(scale, offset) [groups, out] in a dtype the kernel reads; a symmetric tensor's offset is -2^(k-1) scale."""
  scale = qt["scale"]
  offset = qt["offset"] if "offset" in qt.arrays else -(2 ** (qt.bits - 1)) * scale
  dtype = scale.dtype if np.dtype(scale.dtype) in TARGETS else jnp.float32
  return scale.astype(dtype), offset.astype(dtype)


def matmul(x: jax.Array, w: Strips | QTensor) -> jax.Array:
  """x W~ [..., out] in x.dtype (the kernel: see the module docstring); a QTensor is laid out first."""
  return matmul_shared(x, [w])[0]


def compatible(weights) -> bool:
  """Whether `matmul_shared` takes these weights in one call: equal `in`, bits, group size and scale dtype."""
  weights = [w if isinstance(w, Strips) else strips(w) for w in weights]
  return len({(w.shape[0], w.meta.bits, w.meta.group_size, np.dtype(w.scale.dtype)) for w in weights}) == 1


def matmul_shared(x: jax.Array, weights) -> list[jax.Array]:
  """[x W~ for W in weights] in one kernel call (weights that read the same x, such as q/k/v or gate/up): x is
  quantized once, and the call's strips are shared between the threads. The weights must be `compatible`."""
  weights = [w if isinstance(w, Strips) else strips(w) for w in weights]
  n_in, meta = weights[0].shape[0], weights[0].meta
  rows = x.reshape(-1, n_in).astype(jnp.float32)
  call = jax.ffi.ffi_call(TARGETS[np.dtype(weights[0].scale.dtype)],
                          [jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), jnp.float32) for w in weights],
                          vmap_method="sequential")
  ys = call(rows, *[a for w in weights for a in (w.codes, w.scale, w.offset)], group=np.int64(meta.group_size),
            bits=np.int64(meta.bits))
  return [y.reshape(x.shape[:-1] + (w.shape[1],)).astype(x.dtype) for y, w in zip(ys, weights)]


def reference(x: jax.Array, qt: QTensor | Strips) -> jax.Array:
  """The kernel's arithmetic in plain JAX (float32): int8 activations per block, then the formula above."""
  qt = qt.qtensor() if isinstance(qt, Strips) else qt
  n_in, n_out = qt.shape
  g = qt.group_size
  blk = block_size(g)
  xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (n_in // g, g // blk, blk))
  amax = jnp.abs(xb).max(axis=-1, keepdims=True)
  xq = jnp.round(xb * jnp.where(amax > 0, 127.0 / amax, 0.0))
  q = packing.unpack(qt["codes"], qt.bits, n_in).astype(jnp.float32).reshape(n_in // g, g // blk, blk, n_out)
  dots = jnp.einsum("...gbi,gbio->...gbo", xq, q)
  scale, offset = (s.astype(jnp.float32) for s in _scales(qt))
  t = ((amax / 127.0) * dots).sum(-2)  # [..., groups, out]
  return ((scale * t).sum(-2) + (xb.sum((-2, -1))[..., None] * offset).sum(-2)).astype(x.dtype)


def block_size(group_size: int) -> int:
  """Inputs a block of the activations' int8 quantization: 16, or the whole group when 16 does not divide it."""
  return group_size if group_size % 16 else 16
