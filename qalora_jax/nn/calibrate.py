"""Calibration inside a model's own forward pass: the Hessians H = (2 / N) sum x x^T of the inputs x that a
model's qalora_jax.nn.Linear layers receive, captured by the layers themselves (`Linear.capture`), "true
sequential": layers are quantized in the order the forward pass first calls them, those sharing one input array
together, each group's inputs computed with the earlier groups already quantized (one partial forward pass per
group, jitted and stopped at the group's last layer).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from qalora_jax.nn.modules import Linear, adapted_layers


def call_model(model, batch):
  """The default calibration forward pass: model(batch)."""
  return model(batch)


class _Done(Exception):
  """Raised from a capture to stop a forward pass once the layers being calibrated have run."""


def call_order(model: nnx.Module, layers: dict[str, Linear], batch, forward) -> list[list[str]]:
  """The layers in the order `forward(model, batch)` first calls them, those called on one input array grouped."""
  names = {id(layer): p for p, layer in layers.items()}
  calls: list[tuple[str, jax.Array]] = []  # holding the inputs keeps each one alive, so identity is meaningful

  def record(layer, flat, x):
    p = names[id(layer)]
    if all(p != q for q, _ in calls):
      calls.append((p, x))

  with _capturing(layers.values(), record):
    forward(model, batch)
  missing = [p for p in layers if all(p != q for q, _ in calls)]
  if missing:
    raise ValueError(f"calibration: the forward pass never calls {', '.join(missing)}; allowed: layers the "
                     f"model's forward uses")
  groups: list[list[str]] = []
  last = None
  for p, x in calls:
    if groups and x is last:
      groups[-1].append(p)
    else:
      groups.append([p])
    last = x
  return groups


@contextlib.contextmanager
def _capturing(layers, fn):
  """Sets `capture` on the given layers for the duration of a `with` block."""
  layers = list(layers)
  for layer in layers:
    layer.capture = fn
  try:
    yield
  finally:
    for layer in layers:
      layer.capture = None


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _group_grams(graphdef, group: tuple[str, ...], forward, state, batch) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{path: (sum x x^T, number of inputs x)} of the inputs the layers of `group` receive in forward(model, batch),
  jitted: the trace stops at the group's last call, so only the part of the forward pass they need is compiled and
  run."""
  model = nnx.merge(graphdef, state)
  members = {id(layer): p for p, layer in adapted_layers(model) if p in group}
  grams: dict[str, jax.Array] = {}

  def capture(layer, flat, x):
    p = members.get(id(layer))
    if p is not None and p not in grams:
      x = flat.reshape(-1, flat.shape[-1]).astype(jnp.float32)
      grams[p] = (x.T @ x, jnp.asarray(x.shape[0], jnp.float32))
      if len(grams) == len(members):
        raise _Done

  with _capturing([layer for _, layer in adapted_layers(model)], capture):
    try:
      forward(model, batch)
    except _Done:
      pass
  return grams


def calibrate_sequential(model: nnx.Module, layers: dict[str, Linear], batches: list, forward,
                         quantize: Callable[[str, jax.Array], None]) -> None:
  """Quantizes `layers` (paths relative to `model`) with H = (2 / N) sum x x^T of their inputs over `batches`,
  true sequential: for each group of `call_order`, the group's Grams are collected over every batch (a jitted
  forward pass stopped at the group's last layer) with the earlier groups already quantized, then
  `quantize(path, H)` replaces those layers' kernels. `forward(model, batch)` must be hashable (a function)."""
  if not batches:
    raise ValueError("calibration is empty; allowed: at least one batch")
  for group in call_order(model, layers, batches[0], forward):
    grams = {p: 0.0 for p in group}
    tokens = {p: 0.0 for p in group}
    graphdef, state = nnx.split(model)
    for batch in batches:
      for p, (gram, n) in _group_grams(graphdef, tuple(group), forward, state, batch).items():
        grams[p], tokens[p] = grams[p] + gram, tokens[p] + n
    for p in group:
      quantize(p, (2.0 / tokens[p]) * grams[p])
