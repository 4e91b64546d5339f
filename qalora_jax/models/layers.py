"""The building blocks of the decoder as pure functions: dense, RMSNorm, RoPE, SwiGLU, the output head (attention
has its own module, models/attention.py).

Every linear layer goes through `qalora_jax.nn.linear.linear`, the one place a weight (a float kernel, a
QTensor, and optionally an adapter) meets an activation, so every method runs through the same model code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qalora_jax.kernels import cpu_gemm, cpu_matmul
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

      nll_t = logsumexp_v(z_t) - z_t[y_t],   z_t = x_t W,   dnll_t / dx_t = sum_v softmax(z_t)_v W_v - W_{y_t}

  x [..., D], targets [...] -> [...]. The logits are made `chunk` positions and `vocab_chunk` tokens of the
  vocabulary at a time, in a loop over the vocabulary's chunks, so that one chunk of logits exists at a time.
  Under differentiation the same loop also accumulates dnll / dx: with m the running maximum, each chunk adds
  exp(z - m) to the softmax's sum and exp(z - m) W^T to the gradient, both rescaled by exp(m_old - m_new) when m
  grows (the online softmax). The backward pass then only scales that gradient by each position's cotangent:
  the logits are made once, and none is kept for the backward pass. A weight the int8 kernel reads is not split
  over the vocabulary (its gradient goes through the float weight). The head's own gradient is computed for a
  float weight (for a QTensor, none), making the logits again.
  """
  lead = targets.shape
  nll = _head_nll(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1).astype(jnp.int32), vocab_first,
                  matmul_dtype, chunk, vocab_chunk)
  return nll.reshape(lead)


def _chunks(n: int, chunk: int):
  return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _vocab_chunks(w: jax.Array, vocab_first: bool, vocab_chunk: int):
  """[(start, the float weight's columns for tokens [start, start + n))]."""
  vocab = w.shape[0] if vocab_first else w.shape[1]
  return [(c.start, w[c] if vocab_first else w[:, c]) for c in _chunks(vocab, vocab_chunk)]


def _head_pass(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk, grad: bool):
  """(nll [N], logsumexp [N], and with `grad` dnll / dx [N, D] in x.dtype, else None); see `head_nll`."""
  dtype = operand_dtype(matmul_dtype, x.dtype)
  int8 = matmul_dtype == "int8" and isinstance(weight, (QTensor, cpu_matmul.Strips))
  # float32 products with a quantized [D, V] table: the CPU GEMM reads its codes, chunk by chunk
  gemm = not vocab_first and cpu_gemm.supports(weight, min(chunk, x.shape[0]), dtype)
  w = materialize(weight, dtype) if (grad or not int8) and not gemm else None  # once; kernels read `weight`
  axis = 0 if vocab_first else 1
  vocab = weight.shape[axis]
  bits = w is not None and w.dtype == jnp.bfloat16
  table = jax.lax.bitcast_convert_type(w, jnp.uint16) if bits else w

  def columns(start, n):
    """w's rows or columns for tokens [start, start + n) (for the GEMM, the QTensor's columns). A bfloat16 table
    enters the loop as its bits: XLA's CPU backend otherwise carries it into the loop as a float32 copy (twice the
    table, made every step)."""
    if gemm:
      return weight.column_range(start, n)
    piece = jax.lax.dynamic_slice_in_dim(table, start, n, axis)
    return jax.lax.bitcast_convert_type(piece, jnp.bfloat16) if bits else piece
  size = vocab if int8 else min(vocab_chunk, vocab)
  n_loop = vocab // size

  def add(carry, z, start, n, tc):
    """The running (m, sum, z[target], dnll / dx) after z, the logits of tokens [start, start + n)."""
    m, total, picked, acc = carry
    top = jnp.maximum(m, z.max(axis=-1))
    e = jnp.exp(z - top[:, None])
    rescale = jnp.exp(m - top)
    local = tc - start
    inside = (local >= 0) & (local < n)
    here = jnp.take_along_axis(z, jnp.clip(local, 0, n - 1)[:, None], axis=-1)[:, 0]
    picked = picked + jnp.where(inside, here, 0.0)
    if acc is not None:
      w_v = columns(start, n)
      if gemm:
        acc = acc * rescale[:, None] + cpu_gemm.matmul(e, w_v, transpose=True)
      else:
        acc = acc * rescale[:, None] + jnp.einsum("cv,vd->cd" if vocab_first else "cv,dv->cd", e.astype(w.dtype),
                                                  w_v, preferred_element_type=jnp.float32)
    return top, total * rescale + e.sum(axis=-1), picked, acc

  def logits(xc, start, n):
    if int8:
      return head_logits(xc, weight, vocab_first, matmul_dtype)
    if gemm:
      return cpu_gemm.matmul(xc.astype(jnp.float32), columns(start, n))
    return head_logits(xc, columns(start, n), vocab_first, matmul_dtype)

  nll, lse, dx = [], [], []
  for c in _chunks(x.shape[0], chunk):
    xc, tc = x[c], targets[c]
    rows = xc.shape[0]
    carry = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, x.shape[1]), jnp.float32) if grad else None)

    def body(carry, i, xc=xc, tc=tc):
      return add(carry, logits(xc, i * size, size), i * size, size, tc), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_loop))
    if vocab > n_loop * size:  # the last, shorter chunk
      start, n = n_loop * size, vocab - n_loop * size
      carry = add(carry, logits(xc, start, n), start, n, tc)
    m, total, picked, acc = carry
    lse.append(m + jnp.log(total))
    nll.append(lse[-1] - picked)
    if grad:
      if gemm:  # the targets' columns, dequantized
        w_y = weight.columns(tc).dequantize(jnp.float32)
      else:
        w_y = jnp.take(w, tc, axis=axis)
      dx.append((acc / total[:, None] - (w_y if vocab_first else w_y.T).astype(jnp.float32)).astype(x.dtype))
  return jnp.concatenate(nll), jnp.concatenate(lse), (jnp.concatenate(dx) if grad else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_nll(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk):
  return _head_pass(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk, grad=False)[0]


def _head_nll_fwd(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk):
  nll, lse, dx = _head_pass(x, weight, targets, vocab_first, matmul_dtype, chunk, vocab_chunk, grad=True)
  float_weight = not isinstance(weight, (QTensor, cpu_matmul.Strips))
  return nll, (dx, x if float_weight else None, weight, targets, lse if float_weight else None)


def _head_nll_bwd(vocab_first, matmul_dtype, chunk, vocab_chunk, residuals, g):
  dxp, x, weight, targets, lse = residuals
  dx = (g[:, None] * dxp).astype(dxp.dtype)
  if x is None:
    return dx, None, None
  # a float weight's own gradient, dW = x^T (softmax(z) - onehot(y)) g, with the logits made again (left out by
  # XLA where the weight is frozen, as nothing uses it)
  dtype = operand_dtype(matmul_dtype, x.dtype)
  pieces = _vocab_chunks(materialize(weight, dtype), vocab_first, vocab_chunk)
  dw = [None] * len(pieces)
  for c in _chunks(x.shape[0], chunk):
    xc = x[c].astype(dtype)
    for i, (start, w_v) in enumerate(pieces):
      z = head_logits(x[c], w_v, vocab_first, dtype)
      onehot = (start + jnp.arange(z.shape[-1]))[None, :] == targets[c, None]
      dz = ((jnp.exp(z - lse[c, None]) - onehot) * g[c, None]).astype(dtype)
      part = jnp.einsum("cv,cd->vd" if vocab_first else "cd,cv->dv", *((dz, xc) if vocab_first else (xc, dz)),
                        preferred_element_type=jnp.float32)
      dw[i] = part if dw[i] is None else dw[i] + part
  return dx, jnp.concatenate(dw, axis=0 if vocab_first else 1).astype(weight.dtype), None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)
