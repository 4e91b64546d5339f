"""The building blocks of the decoder as pure functions: dense, RMSNorm, RoPE, SwiGLU, the output head (attention
has its own module, models/attention.py).

Every linear layer goes through `qalora_jax.nn.linear.linear`, the one place a weight (a float kernel, a
QTensor, and optionally an adapter) meets an activation, so every method runs through the same model code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qalora_jax.kernels import cpu_matmul
from qalora_jax.nn.linear import base_matmul, linear, materialize, operand_dtype
from qalora_jax.quant import QTensor

__all__ = ["apply_rope", "dense", "head_logits", "head_nll", "linear", "materialize", "rms_norm", "subkey",
           "rope_angles", "silu_mul", "swiglu"]


def dense(x: jax.Array, kernel, bias=None) -> jax.Array:
  """y = x W + b, with W [in, out] a float kernel or a QTensor (see `linear`)."""
  return linear(x, {"kernel": kernel, "bias": bias})


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """y = scale * x / sqrt(mean(x^2) + eps), the statistic taken in float32.

  The rows are flattened to [N, D] first: XLA's CPU backend reduces a [1, t, D] array (batch 1, as in the
  backward pass's sum(dy * x) at 1 x 2048) about ten times slower than the same [t, D] one."""
  x32 = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype).reshape(x.shape)


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


def subkey(rng: jax.Array | None, i: int) -> jax.Array | None:
  """A distinct key per use of a (possibly absent) dropout key."""
  return None if rng is None else jax.random.fold_in(rng, i)


@jax.custom_vjp
def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
  """SwiGLU's product silu(g) * u = g sigmoid(g) u, with its gradients written out (s = sigmoid(g)):

    du = dy g s,   dg = dy u s (1 + g (1 - s))

  so the backward pass keeps g and u alone and makes s again (left to autodiff it keeps g, u and three arrays
  of silu's, each [tokens, ffn]: the largest residuals of a block)."""
  return jax.nn.silu(gate) * up


def _silu_mul_fwd(gate, up):
  return silu_mul(gate, up), (gate, up)


def _silu_mul_bwd(residuals, dy):
  gate, up = residuals
  s = jax.nn.sigmoid(gate)
  return dy * up * s * (1 + gate * (1 - s)), dy * gate * s


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


def swiglu(x: jax.Array, p: dict, dropout_rng: jax.Array | None = None, matmul_dtype: str | None = None
           ) -> jax.Array:
  """SwiGLU MLP: down(silu(gate(x)) * up(x)), each projection a `linear` on its parameter dict."""
  gate = linear(x, p["gate_proj"], dropout_rng=subkey(dropout_rng, 0), matmul_dtype=matmul_dtype)
  up = linear(x, p["up_proj"], dropout_rng=subkey(dropout_rng, 1), matmul_dtype=matmul_dtype)
  return linear(silu_mul(gate, up), p["down_proj"], dropout_rng=subkey(dropout_rng, 2), matmul_dtype=matmul_dtype)


def head_logits(x: jax.Array, weight, vocab_first: bool, matmul_dtype: str | None = None) -> jax.Array:
  """Logits in float32: x E^T for a vocab-first table E [V, D] (tied embeddings), else x W for W [D, V] (with
  matmul_dtype "int8", a quantized W goes through `base_matmul` to the CPU kernel)."""
  if isinstance(weight, (QTensor, cpu_matmul.Strips)) and matmul_dtype == "int8" and not vocab_first:
    return base_matmul(x.astype(jnp.float32), weight, matmul_dtype)
  w = materialize(weight, operand_dtype(matmul_dtype, x.dtype))
  spec = "...d,vd->...v" if vocab_first else "...d,dv->...v"
  return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def head_nll(x: jax.Array, weight, targets: jax.Array, *, vocab_first: bool, matmul_dtype: str | None = None,
             chunk: int = 512, vocab_chunk: int = 8192) -> jax.Array:
  """-log softmax(logits)[target] per position (float32), the output head and the softmax fused:

      nll_t = logsumexp_v(z_t) - z_t[y_t],   z_t = head_logits(x_t),   dnll_t / dz_t = softmax(z_t) - onehot(y_t)

  x [..., D], targets [...] -> [...]. The logits are made `chunk` positions and `vocab_chunk` tokens of the
  vocabulary at a time, in the forward pass (the logsumexp accumulated online over the vocabulary's chunks)
  and again in the backward pass, so the [positions, V] logits (and their gradient) are never whole: only x
  and the logsumexp are kept. A weight the int8 kernel reads is not split over the vocabulary. The head's own
  gradient is computed for a float weight (for a QTensor, none).
  """
  lead = targets.shape
  nll = _head_nll(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1).astype(jnp.int32), vocab_first,
                  matmul_dtype, chunk, vocab_chunk)
  return nll.reshape(lead)


def _chunks(n: int, chunk: int):
  return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _vocab_chunks(w, vocab_first: bool, vocab_chunk: int):
  """[(start, the weight's columns for tokens [start, start + n))]: slices of a float weight, or the whole of a
  quantized one."""
  if not isinstance(w, jax.Array):
    return [(0, w)]
  vocab = w.shape[0] if vocab_first else w.shape[1]
  return [(c.start, w[c] if vocab_first else w[:, c]) for c in _chunks(vocab, vocab_chunk)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_nll(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk):
  return _head_nll_fwd(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk)[0]


def _head_nll_fwd(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk):
  nll, lse = [], []
  w = weight if matmul_dtype == "int8" else materialize(weight, operand_dtype(matmul_dtype, x.dtype))  # once
  for c in _chunks(x.shape[0], chunk):
    m = total = picked = None
    for start, w_v in _vocab_chunks(w, vocab_first, vocab_chunk):
      z = head_logits(x[c], w_v, vocab_first, matmul_dtype)
      top = z.max(axis=-1) if m is None else jnp.maximum(m, z.max(axis=-1))
      part = jnp.exp(z - top[:, None]).sum(axis=-1)
      total = part if total is None else total * jnp.exp(m - top) + part
      m = top
      local = targets[c] - start
      inside = (local >= 0) & (local < z.shape[-1])
      here = jnp.where(inside, jnp.take_along_axis(z, jnp.clip(local, 0, z.shape[-1] - 1)[:, None], axis=-1)[:, 0],
                       0.0)
      picked = here if picked is None else picked + here
    logz = m + jnp.log(total)
    nll.append(logz - picked)
    lse.append(logz)
  return jnp.concatenate(nll), (x, weight, targets, jnp.concatenate(lse))


def _head_nll_bwd(vocab_first, matmul_dtype, chunk, vocab_chunk, residuals, g):
  x, weight, targets, lse = residuals
  w = materialize(weight, operand_dtype(matmul_dtype, x.dtype))
  pieces = _vocab_chunks(w, vocab_first, vocab_chunk)
  dx, dw = [], [None] * len(pieces)
  for c in _chunks(x.shape[0], chunk):
    dx_c = None
    for i, (start, w_v) in enumerate(pieces):
      z = head_logits(x[c], w_v, vocab_first, w.dtype)
      onehot = (start + jnp.arange(z.shape[-1]))[None, :] == targets[c, None]
      dz = ((jnp.exp(z - lse[c, None]) - onehot) * g[c, None]).astype(w.dtype)
      part = jnp.einsum("cv,vd->cd" if vocab_first else "cv,dv->cd", dz, w_v, preferred_element_type=x.dtype)
      dx_c = part if dx_c is None else dx_c + part
      if not isinstance(weight, QTensor):
        xc = x[c].astype(w.dtype)
        part = jnp.einsum("cv,cd->vd" if vocab_first else "cd,cv->dv", *((dz, xc) if vocab_first else (xc, dz)),
                          preferred_element_type=jnp.float32)
        dw[i] = part if dw[i] is None else dw[i] + part
    dx.append(dx_c)
  dweight = None if dw[0] is None else jnp.concatenate(dw, axis=0 if vocab_first else 1).astype(weight.dtype)
  return jnp.concatenate(dx), dweight, None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)
