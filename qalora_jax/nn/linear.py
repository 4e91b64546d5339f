"""The one place a weight meets an activation: y = x W (+ b) (+ the adapter branch).

W is a float kernel [in, out] or a QTensor, dequantized here (to the compute dtype, or to a lower matmul dtype),
so every method (float, quantized, adapted) runs through the same model code.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qalora_jax.kernels import cpu_gemm, cpu_matmul
from qalora_jax.kernels import int4_matmul as pallas_int4
from qalora_jax.nn.adapters import Adapter, adapter_delta, delta_weight, pool_groups
from qalora_jax.quant import QTensor


def materialize(kernel, dtype) -> jax.Array:
  """A kernel as a float array of `dtype`: a QTensor (or cpu_matmul.Strips) is dequantized, a float array is cast."""
  if isinstance(kernel, cpu_matmul.Strips):
    kernel = kernel.qtensor()
  if isinstance(kernel, QTensor):
    return kernel.dequantize(dtype)
  return jnp.asarray(kernel).astype(dtype)


def operand_dtype(matmul_dtype: str | None, dtype):
  """The float dtype a weight is materialized in for `matmul_dtype` (None and "int8": the compute dtype)."""
  return dtype if matmul_dtype in (None, "int8") else jnp.dtype(matmul_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def base_matmul(x: jax.Array, kernel, matmul_dtype=None) -> jax.Array:
  """y = x W in x.dtype, the operands cast to `matmul_dtype` (None: x.dtype) and accumulated in x.dtype.

  matmul_dtype "int8" multiplies an INT4 QTensor with int8-quantized activations in the CPU decoding kernel
  (qalora_jax.kernels.cpu_matmul) where it runs; other weights, and every weight where it does not, use x.dtype.
  On CUDA GPUs an INT4 QTensor and few rows run x W and dy W^T in the Pallas kernel (kernels/int4_matmul.py); on
  CPUs, float32 operands and an INT4 QTensor run them in the GEMM that dequantizes as it packs (kernels/cpu_gemm.py).

  Its gradients are written out so that nothing float is kept for a quantized W:
    dx = dy W^T   (W dequantized again in the backward pass, straight into the matmul)
    dW = x^T dy   (float kernels only; a QTensor is frozen and gets none)
  """
  if matmul_dtype == "int8" and cpu_matmul.supports(kernel):
    return cpu_matmul.matmul(x, kernel)
  dtype = operand_dtype(matmul_dtype, x.dtype)
  if cpu_gemm.supports(kernel, math.prod(x.shape[:-1]), dtype):
    return cpu_gemm.matmul(x, kernel)

  def xla(x, kernel):
    w = materialize(kernel, dtype)
    return jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=x.dtype)

  return pallas_int4.dispatch(x, kernel, dtype, xla)


def _base_matmul_fwd(x, kernel, matmul_dtype):
  frozen = isinstance(kernel, (QTensor, cpu_matmul.Strips))
  return base_matmul(x, kernel, matmul_dtype), (None if frozen else x, kernel)


def _base_matmul_bwd(matmul_dtype, residuals, dy):
  x, kernel = residuals
  dtype = operand_dtype(matmul_dtype, dy.dtype)
  if x is None:  # a frozen QTensor: dx only
    if cpu_gemm.supports(kernel, math.prod(dy.shape[:-1]), dtype):
      return cpu_gemm.matmul(dy, kernel, transpose=True), None

    def xla(dy, kernel):
      w = materialize(kernel, dtype)
      return jnp.einsum("...o,io->...i", dy.astype(w.dtype), w, preferred_element_type=dy.dtype)

    return pallas_int4.dispatch(dy, kernel, dtype, xla, transpose=True), None
  w = materialize(kernel, dtype)
  dx = jnp.einsum("...o,io->...i", dy.astype(w.dtype), w, preferred_element_type=dy.dtype)
  dw = jnp.einsum("...i,...o->io", x.astype(w.dtype), dy.astype(w.dtype), preferred_element_type=jnp.float32)
  return dx, dw.astype(kernel.dtype)


base_matmul.defvjp(_base_matmul_fwd, _base_matmul_bwd)


def folds(x: jax.Array, kernel, adapter: Adapter, dropout_rng, matmul_dtype) -> bool:
  """Whether `linear` runs a QA-LoRA adapter folded into the base product (`folded_matmul`): a "qalora" adapter
  without dropout in this call, pooling the groups the QTensor is quantized in, on float32 operands in the CPU
  GEMM (cpu_gemm.supports)."""
  meta = adapter.meta
  return (meta.kind == "qalora" and (dropout_rng is None or meta.dropout == 0) and isinstance(kernel, QTensor)
          and x.dtype == jnp.float32 and adapter.a.ndim == 2 and meta.group_size == kernel.group_size
          and cpu_gemm.supports(kernel, math.prod(x.shape[:-1]), operand_dtype(matmul_dtype, x.dtype))
          and adapter.a.shape[0] == kernel["scale"].shape[0])


@jax.custom_vjp
def folded_matmul(x: jax.Array, kernels: tuple[QTensor, ...], adapters: tuple[Adapter, ...]) -> list[jax.Array]:
  """[x W~_j + s_j (pool(x) A_j) B_j for each j]: QA-LoRA's branch as a change of the per-group offsets,

    x W~ + s (pool(x) A) B = x (W~ + P delta),   delta = s A B [groups, out],   P_il = [i in group l]

  (the merge of nn/merge.py, made in every call), so the product with the offsets plus delta is the only
  product with x (cpu_gemm.matmul's `offset_delta`). Several linears that read the same x go side by side
  (QTensor.concat_columns), one product for all (`shared_folded`). Gradients, dy = [dy_1 ... dy_n]:

    dx = dy (W~ + P delta)^T,   d delta = pool(x)^T dy,   dA = s d delta B^T,   dB = s A^T d delta

  where the branch on its own makes x A, (x A) B, dy B^T, (dy B^T) A^T and h^T dy, and adds two [tokens, in or
  out] results. Equal to the branch up to float32 rounding. What the backward pass keeps is the pooled x (named
  "adapter_pooled") and the call's own arguments; the weights and offsets side by side are made again.
  """
  kernel, delta = _side_by_side(kernels, adapters)
  return _split(cpu_gemm.matmul(x, kernel, offset_delta=delta), kernels)


def _side_by_side(kernels, adapters):
  delta = jnp.concatenate([delta_weight(a) for a in adapters], axis=-1)
  return (kernels[0] if len(kernels) == 1 else QTensor.concat_columns(list(kernels))), delta


def _split(y, kernels):
  return jnp.split(y, list(itertools.accumulate(k.shape[1] for k in kernels[:-1])), axis=-1)


def _folded_fwd(x, kernels, adapters):
  pooled = checkpoint_name(pool_groups(x, kernels[0].group_size), "adapter_pooled")
  return folded_matmul(x, kernels, adapters), (pooled, kernels, adapters)


def _folded_bwd(residuals, dys):
  pooled, kernels, adapters = residuals
  kernel, delta = _side_by_side(kernels, adapters)
  dy = jnp.concatenate(dys, axis=-1)
  dx = cpu_gemm.matmul(dy, kernel, transpose=True, offset_delta=delta)
  ddelta = jnp.einsum("tl,to->lo", pooled.reshape(-1, pooled.shape[-1]), dy.reshape(-1, dy.shape[-1]))
  grads = tuple(Adapter((a.meta.scale * d @ a.b.T).astype(a.a.dtype), (a.meta.scale * a.a.T @ d).astype(a.b.dtype),
                        a.meta) for a, d in zip(adapters, _split(ddelta, kernels)))
  return dx, None, grads


folded_matmul.defvjp(_folded_fwd, _folded_bwd)


def shared_folded(x: jax.Array, ps: list[dict], dropout_rngs: list, matmul_dtype) -> list[jax.Array] | None:
  """[linear(x, p) for p in ps] for linears that read the same x (q/k/v, gate/up), as one `folded_matmul`; None
  where not every one `folds`, their QTensors are not alike (QTensor.columns_alike), or none is narrower than
  cpu_gemm.NARROW (SmolLM2's q/k/v share a product, its gate/up do not)."""
  adapters = [p.get("adapter") for p in ps]
  if not all(isinstance(a, Adapter) and folds(x, p["kernel"], a, rng, matmul_dtype)
             for p, a, rng in zip(ps, adapters, dropout_rngs)):
    return None
  if min(p["kernel"].shape[1] for p in ps) >= cpu_gemm.NARROW:
    return None
  kernels = [p["kernel"] for p in ps]
  if not QTensor.columns_alike(kernels):
    return None
  ys = folded_matmul(x, tuple(kernels), tuple(adapters))
  return [y if p.get("bias") is None else y + p["bias"].astype(x.dtype) for p, y in zip(ps, ys)]


def linear(x: jax.Array, p: dict, *, dropout_rng: jax.Array | None = None, matmul_dtype: str | None = None
           ) -> jax.Array:
  """y = x W + b + s * (pool(x) A) B for p = {"kernel", optional "bias", optional "adapter"}; x W as in
  `base_matmul`, the adapter branch in x.dtype (or folded into the product, see `folds`)."""
  adapter = p.get("adapter")
  if isinstance(adapter, Adapter) and folds(x, p["kernel"], adapter, dropout_rng, matmul_dtype):
    (y,) = folded_matmul(x, (p["kernel"],), (adapter,))
    adapter = None
  else:
    y = base_matmul(x, p["kernel"], matmul_dtype)
  if p.get("bias") is not None:
    y = y + p["bias"].astype(x.dtype)
  if isinstance(adapter, Adapter):
    y = y + adapter_delta(x, adapter, dropout_rng=dropout_rng)
  return y
