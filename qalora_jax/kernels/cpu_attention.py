"""Decoding attention on the CPU: softmax(q k^T / sqrt(d) + mask) v for a few queries against a KV cache,
read as it lies ([b, S, K, d]) by a C++ kernel (cpu_attention.cc).

A decoding step's attention is tiny (one query a head), and XLA's CPU backend spends most of its time on it
copying each layer's cache into the layout its dot wants, at every step. The kernel reads the cache where it
is: for each query head n (KV head n / (h / K)) and each key slot j the query sees,

    s_j = q_n . k_j / sqrt(d),   out_n = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)

in float32, the mask as models.attention.Mask describes it (key_mask, the causal slot `index`, a window).
models.attention uses it for a traced `index` (decoding with a cache) where `supports` holds; the tests hold
it to `attention.dense_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.kernels.cpu_library import available


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether `attention` runs the kernel for these operands: float32, and the kernels build here."""
  return all(a.dtype == jnp.float32 for a in (q, k, v)) and available()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, index, window: int | None = None
              ) -> jax.Array:
  """q [b, t, h, d], k and v [b, S, K, d], key_mask [b, S] bool, index the slot of query 0 -> [b, t, h, d]."""
  call = jax.ffi.ffi_call("qalora_cpu_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method="sequential")
  return call(q, k, v, key_mask.astype(bool), jnp.asarray(index, jnp.int32), window=np.int64(window or 0))
