"""Token-level negative log-likelihood and perplexity of a language model on a token stream."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qalora_jax.models import llama
from qalora_jax.models.config import Config


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position: logits [..., V], targets [...] -> [...] float32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked


@functools.partial(jax.jit, static_argnums=0)
def window_nll(config: Config, params: dict, tokens: jax.Array) -> jax.Array:
  """Summed NLL [b] of tokens[:, 1:] given their prefixes within each row of tokens [b, w]."""
  return llama.nll(config, params, tokens[:, :-1], tokens[:, 1:]).sum(axis=-1)


def perplexity(lm, ids: Sequence[int], window: int = 512, batch_size: int = 1, params: dict | None = None) -> float:
  """exp(mean NLL) over consecutive non-overlapping windows of `window` tokens (a shorter tail is dropped);
  within a window, each token after the first is predicted from the ones before it in the window:

      ppl = exp( sum_w sum_{t=1}^{window-1} -log p(x_{w,t} | x_{w,<t}) / (n_windows (window - 1)) ).
  """
  params = lm.params if params is None else params
  return windowed_perplexity(lambda w: window_nll(lm.config, params, w), ids, window, batch_size)


def model_perplexity(model, ids: Sequence[int], window: int = 512, batch_size: int = 1,
                     logits: Callable | None = None) -> float:
  """`perplexity` of any Flax NNX model that gives logits, e.g. one adapted with `qalora_jax.adapt`:
  `logits(model, tokens [b, w])` -> [b, w, V] (default: model(tokens))."""
  logits = logits or (lambda m, tokens: m(tokens))
  graphdef, state = nnx.split(model)

  @jax.jit
  def nll(state, tokens):
    z = logits(nnx.merge(graphdef, state), tokens[:, :-1])
    return token_nll(z, tokens[:, 1:]).sum(axis=-1)

  return windowed_perplexity(lambda w: nll(state, w), ids, window, batch_size)


def windowed_perplexity(window_nll_fn: Callable, ids: Sequence[int], window: int, batch_size: int) -> float:
  """exp(mean NLL) as in `perplexity`, with window_nll_fn(tokens [b, window]) -> summed NLL [b] of tokens[:, 1:]."""
  ids = np.asarray(ids, np.int32)
  n = len(ids) // window
  if n == 0:
    raise ValueError(f"{len(ids)} tokens are fewer than one window; allowed: at least window={window} tokens")
  windows = ids[: n * window].reshape(n, window)
  total = sum(float(window_nll_fn(jnp.asarray(windows[s:s + batch_size])).sum()) for s in range(0, n, batch_size))
  return float(np.exp(total / (n * (window - 1))))
