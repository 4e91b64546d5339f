"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

    texts = generate(lm, ["Once upon a time"], max_new_tokens=32)                    # greedy
    texts = generate(lm, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1)

Prompts of different lengths are left-padded into one batch; padded slots are masked out of attention and
positions count real tokens only, so each row is computed as if alone. The prompt is processed in one pass
(prefill), then one token per step inside a jitted `jax.lax.while_loop` that ends when every row has produced
an end-of-sequence token or `max_new_tokens` are done.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.kernels import cpu_matmul
from qalora_jax.models import llama
from qalora_jax.models.config import Config


def first_max(logits: jax.Array) -> jax.Array:
  """argmax over the last axis (the first index of the maximum), as int32: min{i : z_i = max z} as two plain
  reductions, which XLA's CPU backend runs several times faster than its index-carrying argmax reduction (a
  row of NaNs gives the last index)."""
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
  return jnp.minimum(first, vocab - 1)


def choose_tokens(logits: jax.Array, key: jax.Array, temperature, top_p, greedy: bool) -> jax.Array:
  """Next tokens [b] from logits [b, V]: argmax when greedy, else a sample from softmax(logits / T)
  restricted to the smallest set of most likely tokens whose probability reaches top_p."""
  if greedy:
    return first_max(logits)
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits, axis=-1)
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(ranked, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  ranked = jnp.where(before < top_p, ranked, -jnp.inf)
  pick = jax.random.categorical(key, ranked, axis=-1)
  return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def sample(config: Config, params: dict, tokens: jax.Array, prompt_mask: jax.Array, key: jax.Array,
           temperature, top_p, *, max_new_tokens: int, greedy: bool) -> tuple[jax.Array, jax.Array]:
  """Generates up to `max_new_tokens` after left-padded prompts.

  Args:
    tokens, prompt_mask: [b, p] prompt ids and their validity (False on the left padding).
  Returns:
    new tokens [b, max_new_tokens] (config.pad_id or 0 after a row's end-of-sequence token) and the number
    of tokens each row produced, its end-of-sequence token included.
  """
  b, p = tokens.shape
  total = p + max_new_tokens
  fill = config.pad_id if config.pad_id is not None else 0
  eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
  cache = llama.init_cache(config, b, total, per_layer=llama.is_per_layer(params["blocks"]))
  key_mask = jnp.zeros((b, total), bool).at[:, :p].set(prompt_mask)
  positions = llama.default_positions(prompt_mask)
  logits, cache = llama.forward(config, params, tokens, positions, key_mask, cache, 0)

  first = choose_tokens(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p, greedy)
  out = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos)
  lengths = jnp.ones((b,), jnp.int32)
  state = (1, first, positions[:, -1] + 1, cache, key_mask, out, done, lengths)

  def cond(state):
    step, *_, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, last, pos, cache, key_mask, out, done, lengths = state
    slot = p + step - 1  # where the previous token's keys and values go
    key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, slot))
    logits, cache = llama.forward(config, params, last[:, None], pos[:, None], key_mask, cache, slot)
    tok = choose_tokens(logits[:, -1], jax.random.fold_in(key, step), temperature, top_p, greedy)
    tok = jnp.where(done, fill, tok)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos)
    return step + 1, tok, pos + 1, cache, key_mask, out, done, lengths

  state = jax.lax.while_loop(cond, body, state)
  return state[5], state[7]


def decoding_params(config: Config, params: dict) -> dict:
  """`params` as decoding reads them: per layer (faster at batch 1 than a scan), and with matmul_dtype "int8"
  the quantized weights laid out for the CPU kernel (kernels.cpu_matmul.prepare). A copy, made once per model;
  `generate_tokens` takes its result as it is."""
  params = llama.unstack_blocks(params)
  return cpu_matmul.prepare(params) if config.matmul_dtype == "int8" else params


def generate_tokens(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int = 0, params: dict | None = None) -> list[list[int]]:
  """The new token ids after each prompt (a list of token ids), the end-of-sequence token excluded.
  temperature=0 decodes greedily; `params` defaults to lm.params, and is read as `decoding_params` makes it
  (a copy for the call, unless already made)."""
  config = lm.config
  if not prompts:
    return []
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} is not supported; allowed: an integer >= 1")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature!r} is not supported; allowed: a number >= 0 (0: greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r} is not supported; allowed: a number in (0, 1]")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty; allowed: at least one token")
    if len(prompt) + max_new_tokens > config.max_seq_len:
      raise ValueError(f"prompt {i} has {len(prompt)} tokens, which with max_new_tokens={max_new_tokens} exceeds "
                       f"the context length max_seq_len={config.max_seq_len}")
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, prompt in enumerate(prompts):
    tokens[i, width - len(prompt):] = prompt
    mask[i, width - len(prompt):] = True
  params = decoding_params(config, lm.params if params is None else params)
  out, lengths = sample(config, params, jnp.asarray(tokens), jnp.asarray(mask),
                        jax.random.PRNGKey(seed), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                        max_new_tokens=max_new_tokens, greedy=temperature == 0)
  out, lengths = np.asarray(out), np.asarray(lengths)
  rows = [[int(t) for t in row[:n]] for row, n in zip(out, lengths)]
  return [row[:-1] if row and row[-1] in config.eos_ids else row for row in rows]


def generate(lm, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, params: dict | None = None) -> list[str]:
  """The text generated after each prompt (the prompt itself not included), special tokens dropped."""
  if lm.tokenizer is None:
    raise ValueError("this model has no tokenizer; use generate_tokens with token ids")
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings, got a single string")
  ids = [lm.tokenizer.encode(p) for p in prompts]
  new = generate_tokens(lm, ids, max_new_tokens, temperature, top_p, seed, params)
  return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
