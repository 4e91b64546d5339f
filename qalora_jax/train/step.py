"""Pure training steps: next-token loss, gradients w.r.t. the trainable tree only, an optax update.

    loss(trainable) = mean over unmasked positions of nll(combine(frozen, trainable), x, y)
    (nll = -log softmax(logits)[y] per position, e.g. `models.nll`)

The frozen tree is an argument of the step, never differentiated; the optimizer state mirrors the trainable
tree alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from qalora_jax.nn.trees import combine


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  trainable: dict
  opt_state: optax.OptState


def learning_rate_schedule(learning_rate: float, *, total_steps: int = 1, warmup_steps: int = 0,
                           schedule: str = "constant") -> optax.Schedule | float:
  """The learning rate of the update at each step (0-based): a linear warmup from 0 over `warmup_steps`, then
  constant or a cosine decay to 0 at `total_steps`. A constant rate without warmup is the float itself (optax
  then keeps no step count in the optimizer state)."""
  if schedule == "constant":
    if not warmup_steps:
      return learning_rate
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                                 optax.constant_schedule(learning_rate)], [warmup_steps])
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
  raise ValueError(f"schedule={schedule!r} is not supported; allowed: constant, cosine")


def learning_rate_at(lr: optax.Schedule | float, step: int) -> float:
  """The rate of `learning_rate_schedule` applied by the update at `step` (0-based: the step-th update)."""
  return float(lr(step)) if callable(lr) else float(lr)


def make_optimizer(learning_rate: float, *, total_steps: int = 1, warmup_steps: int = 0, schedule: str = "constant",
                   max_grad_norm: float | None = 0.3, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """AdamW (moments' decay b1, b2; m / (sqrt(v) + eps)) with global-norm clipping (the QA-LoRA / QLoRA default
  0.3) and a constant or cosine schedule after a linear warmup (`learning_rate_schedule`)."""
  lr = learning_rate_schedule(learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule)
  parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


def make_train_step(nll_fn: Callable, optimizer: optax.GradientTransformation, accum_steps: int = 1,
                    combine: Callable = combine):
  """Returns (init, step): init(trainable) -> TrainState; step(state, frozen, batch, rng) -> (state, metrics).

  `nll_fn(combine(frozen, trainable), inputs, targets, dropout_rng=...)` gives the float32 NLL [batch, seq] of
  each target. `combine` makes the model's parameters from the two halves: `nn.combine` for nested-dict trees
  (the default), or for Flax NNX states `lambda frozen, trainable: nnx.merge(graphdef, trainable, frozen)`,
  whose result is then the model that nll_fn runs. `batch`
  has "inputs", "targets" and optionally "mask" [batch, seq] (1: counted). With accum_steps = k the batch is
  split into k micro-batches whose gradients are averaged (weighted by their token counts) before one update.
  """

  def init(trainable) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))

  def loss_fn(trainable, frozen, micro, rng):
    nll = nll_fn(combine(frozen, trainable), micro["inputs"], micro["targets"], dropout_rng=rng)
    mask = jnp.ones_like(nll) if micro.get("mask") is None else micro["mask"].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen, batch, rng):
    micro = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

    def accumulate(carry, inputs):
      grads, total, count = carry
      i, mb = inputs
      (loss_sum, n), g = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (jnp.arange(accum_steps), micro))
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": total / jnp.maximum(count, 1.0), "tokens": count, "grad_norm": optax.tree.norm(grads)}
    return TrainState(state.step + 1, trainable, opt_state), metrics

  return init, step
