"""The building blocks of the decoder as pure functions: dense, RMSNorm, RoPE, attention, SwiGLU.

Every linear layer goes through `qalora_jax.nn.linear.linear`, the one place a weight (a float kernel, a
QTensor, and optionally an adapter) meets an activation, so every method runs through the same model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qalora_jax.nn.linear import linear, materialize

__all__ = ["apply_rope", "attention", "dense", "fold", "linear", "materialize", "rms_norm", "rope_angles", "swiglu"]


def dense(x: jax.Array, kernel, bias=None) -> jax.Array:
  """y = x W + b, with W [in, out] a float kernel or a QTensor (dequantized to x.dtype)."""
  return linear(x, {"kernel": kernel, "bias": bias})


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """y = scale * x / sqrt(mean(x^2) + eps), the statistic taken in float32."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_angles(positions: jax.Array, freqs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the angles p * f_i, each [batch, seq, head_dim / 2] in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs, jnp.float32)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the pairs (x_i, x_{i + d/2}) of x [batch, seq, heads, d] by the angles p * f_i:

    (x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin)   (the "rotate half" layout).
  """
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention: softmax(q k^T / sqrt(d) + mask) v, each KV head serving num_heads / num_kv_heads
  query heads.

  q [b, t, heads, d], k and v [b, s, kv_heads, d], mask [b, t, s] (True: may attend) -> [b, t, heads, d].
  Scores and softmax are computed in float32.
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def fold(rng: jax.Array | None, i: int) -> jax.Array | None:
  """A distinct key per use of a (possibly absent) dropout key."""
  return None if rng is None else jax.random.fold_in(rng, i)


def swiglu(x: jax.Array, p: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
  """SwiGLU MLP: down(silu(gate(x)) * up(x)), each projection a `linear` on its parameter dict."""
  gate = linear(x, p["gate_proj"], dropout_rng=fold(dropout_rng, 0))
  up = linear(x, p["up_proj"], dropout_rng=fold(dropout_rng, 1))
  return linear(jax.nn.silu(gate) * up, p["down_proj"], dropout_rng=fold(dropout_rng, 2))
