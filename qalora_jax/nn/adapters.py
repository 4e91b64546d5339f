"""Low-rank adapters on a linear layer: LoRA and QA-LoRA, as one pytree type.

    LoRA:     y = x W + s * (dropout(x) A) B,          A [in, r],       B [r, out]
    QA-LoRA:  y = x W~ + s * (pool(dropout(x)) A) B,   A [in / g, r],   B [r, out]

with s = alpha / r (rsLoRA: alpha / sqrt(r)) and B = 0 at initialisation (PEFT's init: A ~ U(-1/sqrt(n),
1/sqrt(n)), n = A's input size). `pool` sums the inputs of each of the base quantizer's groups of g:

    pool(x)_l = sum_{i in group l} x_i                                   (QA-LoRA paper; SUM pooling)

This module is the one place that convention lives. Because pool(x) A B is constant inside a group, it
folds into the base's per-group offsets (merge.py); PEFT's `use_qalora` pools with the mean times
(in // g) instead, a different constant that export/peft.py converts.

An `Adapter` is a pytree: `a` and `b` are its leaves (the trainable parameters), the kind, scale, group
size and dropout rate are static metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

METHODS = ("lora", "qalora")


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
  """Static description of an adapter.

  Attributes:
    kind: "lora" or "qalora".
    scale: s, the factor on the adapter branch (alpha / r, or alpha / sqrt(r) with rsLoRA).
    group_size: g, the pooling window of QA-LoRA (0 for LoRA).
    n_in: the layer's input size (QA-LoRA's last group may be shorter than g).
    dropout: dropout rate on the adapter branch's input.
  """

  kind: str
  scale: float
  group_size: int = 0
  n_in: int = 0
  dropout: float = 0.0


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Adapter:
  """Low-rank factors `a` [..., in or in / g, r] and `b` [..., r, out] (leading axes: stacked layers)."""

  a: jax.Array
  b: jax.Array
  meta: AdapterMeta

  def tree_flatten_with_keys(self):
    return [(jax.tree_util.GetAttrKey("a"), self.a), (jax.tree_util.GetAttrKey("b"), self.b)], self.meta

  @classmethod
  def tree_unflatten(cls, meta, leaves):
    return cls(*leaves, meta)

  @property
  def rank(self) -> int:
    return self.b.shape[-2]

  @property
  def nbytes(self) -> int:
    return self.a.nbytes + self.b.nbytes

  @property
  def effective_rank(self) -> int:
    """The rank the update can reach: dW = P a b, with P [in, L] pooling the input into its L groups for
    QA-LoRA (the identity for LoRA, L = in), so rank(dW) <= e = min(r, L, out)."""
    return min(self.rank, self.a.shape[-2], self.b.shape[-1])

  @property
  def free_params(self) -> int:
    """The trainable parameters that can move the update: the products a b are the [L, out] matrices of rank
    <= e, a set of dimension e (L + out - e) (<= r (L + out), the parameter count); per stacked layer."""
    e, lead = self.effective_rank, math.prod(self.b.shape[:-2])
    return lead * e * (self.a.shape[-2] + self.b.shape[-1] - e)


# What a rematerialised block keeps of its adapters (by checkpoint name): QA-LoRA's pooled inputs pool(x) and
# every adapter's x A, ceil(in / g) and r floats a token and layer, so that the backward pass makes neither again
# (the group sums re-read the whole [tokens, in] input).
REMAT_SAVED = ("adapter_pooled", "adapter_hidden")


def pool_groups(x: jax.Array, group_size: int) -> jax.Array:
  """Sum pooling over groups of `group_size` consecutive inputs: [..., in] -> [..., ceil(in / g)].

  pool(x)_l = sum_{i = l g}^{min((l + 1) g, in) - 1} x_i,   i.e.   pool(x) = x P,  P_il = [i // g == l].

  Written as a reshape and a sum over each group (a shorter last group completed with zeros), whose backward
  pass is a broadcast: both run at memory speed. The product with the 0/1 matrix P ran XLA's CPU matmul with
  ceil(in / g) output columns (18 or 48 for SmolLM2), far below its rate: a QA-LoRA training step at 4 x 128
  runs 1.10x faster this way on an Intel Xeon with AMX (experiments/ab_bench.py).
  """
  n_in = x.shape[-1]
  groups = -(-n_in // group_size)
  if n_in % group_size:  # a shorter last group: zeros complete it
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, groups * group_size - n_in)])
  return x.reshape(*x.shape[:-1], groups, group_size).sum(-1)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
  """s = alpha / r, or rsLoRA's alpha / sqrt(r)."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def layer_key(key: jax.Array, path: str) -> jax.Array:
  """The initialisation key of the adapter at `path`: fold_in(key, crc32(path)). A layer's initial adapter
  depends on the run's key and its own path only, not on the order of the tree or on which layers are adapted."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def init_adapter(key: jax.Array, kind: str, n_in: int, n_out: int, rank: int, *, alpha: float,
                 rslora: bool = False, group_size: int = 0, dropout: float = 0.0,
                 lead: tuple[int, ...] = (), dtype=jnp.float32) -> Adapter:
  """A fresh adapter: A ~ U(-1/sqrt(n), 1/sqrt(n)) with n = A's input size, B = 0 (PEFT's init).

  `lead` adds leading axes (e.g. the layer axis of a scanned model), each slice drawn independently.
  """
  if kind not in METHODS:
    raise ValueError(f"adapter kind={kind!r} is not supported; allowed: {', '.join(METHODS)}")
  if not (isinstance(rank, int) and rank > 0):
    raise ValueError(f"rank={rank!r} must be a positive integer")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
  if kind == "qalora":
    if not (isinstance(group_size, int) and 0 < group_size <= n_in):
      raise ValueError(f"group_size={group_size!r} must be in 1..{n_in} for a qalora adapter")
    a_in = -(-n_in // group_size)
  else:
    a_in, group_size = n_in, 0
  bound = 1.0 / math.sqrt(a_in)
  a = jax.random.uniform(key, lead + (a_in, rank), dtype, -bound, bound)
  b = jnp.zeros(lead + (rank, n_out), dtype)
  meta = AdapterMeta(kind, lora_scale(alpha, rank, rslora), group_size, n_in, float(dropout))
  return Adapter(a, b, meta)


def adapter_delta(x: jax.Array, adapter: Adapter, *, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The adapter branch s * (pool(dropout(x)) A) B for one layer (a, b without leading axes).

  Dropout applies only when `dropout_rng` is given and the rate is positive (training)."""
  meta = adapter.meta
  if dropout_rng is not None and meta.dropout > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - meta.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - meta.dropout), 0).astype(x.dtype)
  if meta.kind == "qalora":
    x = checkpoint_name(pool_groups(x, meta.group_size), "adapter_pooled")
  return _lowrank(x, adapter.a.astype(x.dtype), adapter.b.astype(x.dtype), meta.scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lowrank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """y = s (x A) B, with its gradients written out (h = x A, dy scaled by s):

    dB = h^T dy,   dh = dy B^T,   dA = x^T dh,   dx = dh A^T

  (what autodiff derives, but with each product's operands in the layout they are made in: left to XLA, the
  weight gradients' contraction over tokens transposes the [tokens, out] gradient on CPU, which costs more
  than the whole adapter)."""
  return ((x @ a) @ b) * jnp.asarray(scale, x.dtype)


def _lowrank_fwd(x, a, b, scale):
  h = checkpoint_name(x @ a, "adapter_hidden")
  return (h @ b) * jnp.asarray(scale, x.dtype), (x, h, a, b)


def _lowrank_bwd(scale, residuals, dy):
  x, h, a, b = residuals
  dy = dy * jnp.asarray(scale, dy.dtype)
  dh = jnp.einsum("...o,ro->...r", dy, b)
  x2, h2, dy2, dh2 = (t.reshape(-1, t.shape[-1]) for t in (x, h, dy, dh))
  db = jnp.einsum("tr,to->ro", h2, dy2)
  da = jnp.einsum("ti,tr->ir", x2, dh2)
  dx = jnp.einsum("...r,ir->...i", dh, a)
  return dx, da, db


_lowrank.defvjp(_lowrank_fwd, _lowrank_bwd)


def delta_weight(adapter: Adapter) -> jax.Array:
  """The adapter as a weight update, s * A B: [..., in, out] for LoRA, [..., ceil(in / g), out] per group for
  QA-LoRA (every input of group l gets row l)."""
  return adapter.meta.scale * jnp.einsum("...ir,...ro->...io", adapter.a.astype(jnp.float32),
                                         adapter.b.astype(jnp.float32))
