"""The one place a weight meets an activation: y = x W (+ b) (+ the adapter branch).

W is a float kernel [in, out] or a QTensor, dequantized here (to the compute dtype, or to a lower matmul dtype),
so every method (float, quantized, adapted) runs through the same model code.
"""

from __future__ import annotations

import functools
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
          and adapter.a.shape[0] == kernel["scale"].shape[0]
          and cpu_gemm.supports(kernel, math.prod(x.shape[:-1]), operand_dtype(matmul_dtype, x.dtype)))


@jax.custom_vjp
def folded_matmul(x: jax.Array, kernel: QTensor, delta: jax.Array) -> jax.Array:
  """y = x W~ + pool(x) delta = x (W~ + P delta) for delta = s A B [groups, out]: QA-LoRA's branch as a change of
  the per-group offsets (P_il = [i in group l]; the merge of nn/merge.py, made in every call), so the product
  with the offsets plus delta is the only product with x (cpu_gemm.matmul's `offset_delta`). Gradients:

    dx = dy (W~ + P delta)^T,   d delta = pool(x)^T dy   (then dA = s d delta B^T, dB = s A^T d delta)

  where the branch on its own makes x A, (x A) B, dy B^T, (dy B^T) A^T and h^T dy, and adds two [tokens, in or
  out] results. Equal to x W~ + s (pool(x) A) B up to float32 rounding.
  """
  return cpu_gemm.matmul(x, kernel, offset_delta=delta)


def _folded_fwd(x, kernel, delta):
  pooled = checkpoint_name(pool_groups(x, kernel.group_size), "adapter_pooled")
  return folded_matmul(x, kernel, delta), (pooled, kernel, delta)


def _folded_bwd(residuals, dy):
  pooled, kernel, delta = residuals
  dx = cpu_gemm.matmul(dy, kernel, transpose=True, offset_delta=delta)
  ddelta = jnp.einsum("tl,to->lo", pooled.reshape(-1, pooled.shape[-1]), dy.reshape(-1, dy.shape[-1]))
  return dx, None, ddelta.astype(delta.dtype)


folded_matmul.defvjp(_folded_fwd, _folded_bwd)


def linear(x: jax.Array, p: dict, *, dropout_rng: jax.Array | None = None, matmul_dtype: str | None = None
           ) -> jax.Array:
  """y = x W + b + s * (pool(x) A) B for p = {"kernel", optional "bias", optional "adapter"}; x W as in
  `base_matmul`, the adapter branch in x.dtype (or folded into the product, see `folds`)."""
  adapter = p.get("adapter")
  if isinstance(adapter, Adapter) and folds(x, p["kernel"], adapter, dropout_rng, matmul_dtype):
    y = folded_matmul(x, p["kernel"], delta_weight(adapter))
    adapter = None
  else:
    y = base_matmul(x, p["kernel"], matmul_dtype)
  if p.get("bias") is not None:
    y = y + p["bias"].astype(x.dtype)
  if isinstance(adapter, Adapter):
    y = y + adapter_delta(x, adapter, dropout_rng=dropout_rng)
  return y
