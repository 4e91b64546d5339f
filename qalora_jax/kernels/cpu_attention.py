"""Attention on the CPU, softmax(q k^T / sqrt(d) + mask) v, by C++ kernels (cpu_attention.cc) that read q, k, v
as they lie ([b, t, h, d] and [b, S, K, d]; query head n reads KV head n / (h / K)), in float32, the mask as
models.attention.Mask describes it (key_mask, the slot `index` of query 0, a window):

- `attention`: decoding, a few queries against a KV cache. A decoding step's attention is tiny (one query a
  head), and XLA's CPU backend spends most of its time on it copying each layer's cache into the layout its dot
  wants, at every step. The kernel reads the cache where it is: for each query head n and each key slot j the
  query sees,

      s_j = q_n . k_j / sqrt(d),   out_n = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)

- `sequence_attention`: training and prompts, the whole sequence, differentiable. The FlashAttention recipe
  (Dao et al. 2022) on the CPU: a tile of twelve query rows at a time makes its scores against the keys it may
  see, [12, keys], its softmax and its output, and keeps the log-sum-exp; the backward pass makes the tile's
  probabilities again from it,

      p = exp(s - lse),   ds = p (dout v^T - rowsum(dout * out)) / sqrt(d),
      dq = ds k,   dk = sum over tiles of ds^T q,   dv = sum over tiles of p^T dout

  so neither pass holds a [t, S] score matrix, and keys a tile cannot see are never visited. XLA runs
  attention's small batched dots ([12 G, 64] x [64, keys] per head, G query heads a KV head) and the layout
  copies around them at a fraction of its matmul rate; the kernel's tiles run at most of the FMA units'.
  With `operand_dtype` bfloat16 its five products (q k^T, p v; dout v^T, ds k, ds^T q, p^T dout) round their
  operands to bfloat16 and sum in float32: on AMX tiles where the CPU has them (`cpu_library.amx`; tdpbf16ps,
  tiles of 32 query rows forward, 64 backward), else with AVX512-BF16's vdpbf16ps (twice the float32 FMA
  rate); the softmax, lse, rowsum(dout * out) and all outputs stay float32. Without AVX512-BF16 the products
  stay float32.

models.attention uses them where `supports` / `supports_sequence` hold; the tests hold them to
`attention.dense_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qalora_jax import hardware
from qalora_jax.kernels.cpu_library import amx, available


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether `attention` runs the kernel for these operands: float32, and the kernels build here."""
  return all(a.dtype == jnp.float32 for a in (q, k, v)) and available()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, index, window: int | None = None
              ) -> jax.Array:
  """q [b, t, h, d], k and v [b, S, K, d], key_mask [b, S] bool, index the slot of query 0 -> [b, t, h, d]."""
  call = jax.ffi.ffi_call("qalora_cpu_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q, k, v, key_mask.astype(bool), jnp.asarray(index, jnp.int32), window=np.int64(window or 0))


def supports_sequence(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether `sequence_attention` runs the kernel: float32 operands, a head size that is a multiple of 16 (its
  512-bit lanes), and the kernels build here."""
  return supports(q, k, v) and q.shape[-1] % 16 == 0


@functools.cache
def bf16_products() -> bool:
  """Whether this CPU multiplies bfloat16 pairs (AVX512-BF16), so that `sequence_attention` honours a bfloat16
  operand_dtype."""
  return "avx512_bf16" in hardware.cpu()["flags"]


def _bf16(operand_dtype, head_size: int) -> np.int64:
  """The kernels' `bf16` attribute: 0 float32 products, 1 vdpbf16ps, 2 AMX tiles."""
  if operand_dtype is None or jnp.dtype(operand_dtype) != jnp.bfloat16 or not bf16_products():
    return np.int64(0)
  return np.int64(2 if head_size % 32 == 0 and amx() else 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def sequence_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, index: int = 0,
                       window: int | None = None, operand_dtype=None) -> jax.Array:
  """q [b, t, h, d], k and v [b, S, K, d], key_mask [b, S] bool, `index` (a Python int) the slot of query 0 ->
  [b, t, h, d]. A query that sees no key gets zeros. operand_dtype: bfloat16 rounds the products' operands to
  bfloat16 (see the module docstring); None or float32: float32 products."""
  return _forward(q, k, v, key_mask, index, window, operand_dtype)[0]


def _forward(q, k, v, key_mask, index, window, operand_dtype):
  if not available():
    raise RuntimeError("the CPU kernels are unavailable here; check supports_sequence before calling")
  b, t, h, _ = q.shape
  call = jax.ffi.ffi_call("qalora_cpu_attention_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                       jax.ShapeDtypeStruct((b, t, h), jnp.float32)),
                          vmap_method="sequential")
  out, lse = call(q, k, v, key_mask.astype(bool), index=np.int64(index), window=np.int64(window or 0),
                  bf16=_bf16(operand_dtype, q.shape[-1]))
  # Named, so that a rematerialised block keeps them (models.attention.REMAT_SAVED), not the attention's inputs.
  out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
  return out, (q, k, v, key_mask, out, lse)


def _backward(index, window, operand_dtype, residuals, dout):
  q, k, v, key_mask, out, lse = residuals
  call = jax.ffi.ffi_call("qalora_cpu_attention_bwd", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                                            for x in (q, k, v)), vmap_method="sequential")
  dq, dk, dv = call(q, k, v, key_mask.astype(bool), out, lse, dout.astype(jnp.float32), index=np.int64(index),
                    window=np.int64(window or 0), bf16=_bf16(operand_dtype, q.shape[-1]))
  return dq, dk, dv, None


sequence_attention.defvjp(_forward, _backward)
