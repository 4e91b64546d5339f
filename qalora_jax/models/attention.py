"""Causal grouped-query attention, softmax(q k^T / sqrt(d) + mask) v, in two forms with equal results:

- `dense_attention` forms the scores [b, heads, t, S] whole (short sequences, decoding with a cache);
- `blocked_attention` never does: it walks blocks of queries, and for each the blocks of keys it may see, with
  an online softmax (the FlashAttention recipe, Dao et al. 2022). For a query block i and key blocks j:

      s_j = q_i k_j^T / sqrt(d)                    (masked entries: the float32 minimum)
      m_j = max(m_{j-1}, rowmax s_j),   c_j = exp(m_{j-1} - m_j)
      l_j = c_j l_{j-1} + rowsum exp(s_j - m_j),   o_j = c_j o_{j-1} + exp(s_j - m_j) v_j
      out_i = o_J / l_J,   lse_i = m_J + log l_J

  Its backward pass keeps only q, k, v, out and lse, and makes P_ij = exp(s_ij - lse_i) again block by block:

      D_i = rowsum(dout_i * out_i),   dP_ij = dout_i v_j^T,   dS_ij = P_ij * (dP_ij - D_i)
      dq_i = sum_j dS_ij k_j / sqrt(d),   dk_j = sum_i dS_ij^T q_i / sqrt(d),   dv_j = sum_i P_ij^T dout_i

  Key blocks that the causal mask (or the sliding window) hides from a whole query block are skipped, in both
  passes, so a causal pass costs about half of the dense one and holds at most one [block, block] score tile
  per head.

The mask is described, not materialised: query i (slot `index + i`) sees key slot j iff j <= index + i, the
key slot holds a real token (`key_mask`), and with a window, index + i - j < window. A query that sees no key
at all (a left-padding slot) gets the mean of the values it was offered, which differs between the two forms;
such rows are padding, and nothing reads them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qalora_jax.kernels import cpu_attention

BLOCK = 256
# What a rematerialised block keeps of its attention: the output and the softmax statistics (t x heads x (d + 1)
# floats a layer), all its backward pass needs beside q, k, v, which cost one matmul each to make again.
REMAT_SAVED = ("attention_out", "attention_lse")
NEG = float(jnp.finfo(jnp.float32).min)


class Mask(NamedTuple):
  """Which keys each query sees: key_mask [b, S] (True: a real token), the slot of query 0 (`index`, a Python
  int unless decoding with a cache), and an optional sliding window."""

  key_mask: jax.Array
  index: int | jax.Array = 0
  window: int | None = None

  def block(self, q_start: int, num_q: int, k_start: int, num_k: int) -> jax.Array:
    """[b, num_q, num_k] bool: whether queries q_start.. see keys k_start.."""
    q_slots = self.index + q_start + jnp.arange(num_q)[:, None]
    k_slots = k_start + jnp.arange(num_k)[None, :]
    allowed = k_slots <= q_slots
    if self.window is not None:
      allowed = allowed & (q_slots - k_slots < self.window)
    return allowed[None] & self.key_mask[:, None, k_start:k_start + num_k]

  def dense(self, num_q: int) -> jax.Array:
    """[b, num_q, S] bool, the whole mask."""
    return self.block(0, num_q, 0, self.key_mask.shape[1])

  def visible(self, q_start: int, q_end: int, k_start: int, k_end: int) -> bool:
    """False when no query in [q_start, q_end) can see any key in [k_start, k_end) (needs a static index)."""
    first_q, last_q = self.index + q_start, self.index + q_end - 1
    if k_start > last_q:
      return False
    return self.window is None or first_q - (k_end - 1) < self.window


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, block: int | None = None,
              operand_dtype=None) -> jax.Array:
  """q [b, t, heads, d], k and v [b, S, kv_heads, d] -> [b, t, heads, d]; each KV head serves heads / kv_heads
  query heads. Where the CPU kernels run (kernels.cpu_attention, float32): with a static index (training,
  prompts) the differentiable sequence kernel, with a traced one (decoding with a cache) the decoding kernel
  (not differentiable). Else blocked (`block`, default BLOCK) when the sequence spans more than one block and the
  index is static, and dense otherwise.

  operand_dtype (None: q's dtype): the dtype the products q k^T and p v (and their gradients' products) take
  their operands in, summed in float32; the softmax stays in q's dtype. The decoding kernel, bound by reading
  the cache, keeps float32 products."""
  block = BLOCK if block is None else block
  if isinstance(mask.index, int):
    if cpu_attention.supports_sequence(q, k, v):
      return cpu_attention.sequence_attention(q, k, v, mask.key_mask, mask.index, mask.window, operand_dtype)
  elif cpu_attention.supports(q, k, v):
    return cpu_attention.attention(q, k, v, mask.key_mask, mask.index, mask.window)
  dtype = q.dtype
  if operand_dtype is not None:
    q, k, v = (x.astype(operand_dtype) for x in (q, k, v))
  if isinstance(mask.index, int) and max(q.shape[1], k.shape[1]) > block:
    return blocked_attention(q, k, v, mask.key_mask, mask.index, mask.window, block).astype(dtype)
  return dense_attention(q, k, v, mask).astype(dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
  """softmax(q k^T / sqrt(d) + mask) v with the scores [b, kv_heads, group, t, S] whole, in float32."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  scores = jnp.where(mask.dense(t)[:, None, None, :, :], scores, NEG)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, index: int = 0,
                      window: int | None = None, block: int = BLOCK) -> jax.Array:
  """`dense_attention`'s result without its [t, S] scores: see the module docstring."""
  return _blocked(q, k, v, key_mask, index, window, block)


def _spans(n: int, block: int) -> list[tuple[int, int]]:
  return [(s, min(s + block, n)) for s in range(0, n, block)]


def _heads_major(q, k, v):
  """q [b, t, h, d] -> [b, K, t, G, d] (G = h / K query heads a KV head); k, v -> [b, K, S, d]."""
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 1, 3, 4)
  return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _rows(x, s, e):
  """Query rows s..e of x [b, K, t, G, ...] as [b, K, (e - s) G, ...]."""
  part = x[:, :, s:e]
  return part.reshape(part.shape[0], part.shape[1], -1, *part.shape[4:])


def _scores(qi, kj, mask: Mask, qs, qe, ks, ke, group):
  """s_ij [b, K, (qe - qs) G, ke - ks] in float32, masked entries NEG."""
  s = jnp.einsum("bkqd,bksd->bkqs", qi, kj, preferred_element_type=jnp.float32) / jnp.sqrt(qi.shape[-1]).astype(
      jnp.float32)
  allowed = jnp.repeat(mask.block(qs, qe - qs, ks, ke - ks), group, axis=1)  # rows ordered (t, G), as qi
  return jnp.where(allowed[:, None], s, NEG)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blocked(q, k, v, key_mask, index, window, block):
  return _blocked_fwd(q, k, v, key_mask, index, window, block)[0]


def _blocked_fwd(q, k, v, key_mask, index, window, block):
  b, t, h, d = q.shape
  S, group = k.shape[1], h // k.shape[2]
  mask = Mask(key_mask, index, window)
  qh, kh, vh = _heads_major(q, k, v)
  outs, lses = [], []
  for qs, qe in _spans(t, block):
    qi = _rows(qh, qs, qe)
    m = l = acc = None
    for ks, ke in _spans(S, block):
      if not mask.visible(qs, qe, ks, ke):
        continue
      s = _scores(qi, kh[:, :, ks:ke], mask, qs, qe, ks, ke, group)
      m_new = jnp.max(s, axis=-1) if m is None else jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vh[:, :, ks:ke], preferred_element_type=jnp.float32)
      if m is None:
        l, acc = jnp.sum(p, axis=-1), pv
      else:
        c = jnp.exp(m - m_new)
        l, acc = c * l + jnp.sum(p, axis=-1), c[..., None] * acc + pv
      m = m_new
    outs.append((acc / l[..., None]).astype(q.dtype))
    lses.append(m + jnp.log(l))
  # [b, K, t G, d] -> [b, t, h, d]
  out = jnp.concatenate(outs, axis=2).reshape(b, k.shape[2], t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
  # Named, so that a rematerialised block keeps them (REMAT_SAVED) and does not run the attention again.
  out = checkpoint_name(out, "attention_out")
  lse = checkpoint_name(jnp.concatenate(lses, axis=2), "attention_lse")
  return out, (q, k, v, key_mask, out, lse)


def _blocked_bwd(index, window, block, residuals, dout):
  q, k, v, key_mask, out, lse = residuals
  b, t, h, d = q.shape
  S, kv_heads = k.shape[1], k.shape[2]
  group = h // kv_heads
  mask = Mask(key_mask, index, window)
  scale = 1.0 / jnp.sqrt(d).astype(jnp.float32)
  qh, kh, vh = _heads_major(q, k, v)
  doh = _heads_major(dout, k, v)[0]
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, t, h]
  delta = delta.reshape(b, t, kv_heads, group).transpose(0, 2, 1, 3).reshape(b, kv_heads, t * group)
  dks = {span: None for span in _spans(S, block)}
  dvs = dict(dks)
  dqs = []
  for qs, qe in _spans(t, block):
    qi, doi = _rows(qh, qs, qe), _rows(doh, qs, qe)
    rows = slice(qs * group, qe * group)
    dqi = jnp.zeros(qi.shape, jnp.float32)
    for ks, ke in dks:
      if not mask.visible(qs, qe, ks, ke):
        continue
      kj, vj = kh[:, :, ks:ke], vh[:, :, ks:ke]
      p = jnp.exp(_scores(qi, kj, mask, qs, qe, ks, ke, group) - lse[:, :, rows, None])
      dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(v.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkqd,bksd->bkqs", doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[:, :, rows, None]) * scale).astype(q.dtype)
      dqi = dqi + jnp.einsum("bkqs,bksd->bkqd", ds, kj, preferred_element_type=jnp.float32)
      dk = jnp.einsum("bkqs,bkqd->bksd", ds, qi, preferred_element_type=jnp.float32)
      span = (ks, ke)
      dks[span] = dk if dks[span] is None else dks[span] + dk
      dvs[span] = dv if dvs[span] is None else dvs[span] + dv
    dqs.append(dqi)

  def keys_back(parts):
    full = [jnp.zeros((b, kv_heads, ke - ks, d), jnp.float32) if x is None else x for (ks, ke), x in parts.items()]
    return jnp.concatenate(full, axis=2).transpose(0, 2, 1, 3)

  dq = jnp.concatenate(dqs, axis=2).reshape(b, kv_heads, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
  return dq.astype(q.dtype), keys_back(dks).astype(k.dtype), keys_back(dvs).astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
