"""Data-driven quantization: run the model block by block on calibration tokens and quantize each block's
linear layers with the Hessians of their inputs (GPTQ), or with any other quantizer while measuring the
same output error.

    tokens = calibration_tokens(lm, n_segments=128, seq_len=512, seed=0)   # [128, 512] from the training plays
    frozen, stats = quantize_model(lm.config, lm.params, tokens, quant.get("gptq", bits=4, group_size=128))
    stats.output_rel_error                                                  # mean over the linear layers

Order ("true sequential", as AutoGPTQ): within block l the linears are quantized in four steps, each step's
inputs computed with everything before it already quantized:

    1. q, k, v_proj  on  x1 = norm(h_l)                      (one input, one Hessian)
    2. o_proj        on  x2 = attention(q~, k~, v~)
    3. gate, up_proj on  x3 = norm(h_l + x2 W~_o)             (one input, one Hessian)
    4. down_proj     on  x4 = silu(x3 W~_gate) * (x3 W~_up)

and block l + 1 starts from h_{l+1} = h_l + x2 W~_o + x4 W~_down, the output of the quantized block l.
Each step accumulates H = (2 / N) sum_n x_n x_n^T over the N = segments x seq_len calibration tokens.
A quantizer with `quantize_with_hessian` (GPTQ) gets H; any other quantizes the weight alone. For both, the
output error of each layer on the inputs it sees in the quantized model,

    ||X W - X W~||^2 / ||X W||^2 = tr(D^T H D) / tr(W^T H W),   D = W - W~,

is read off H (no second pass over X) and reported per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qalora_jax import assets, data
from qalora_jax.models import layers, llama
from qalora_jax.models.config import Config, rope_frequencies
from qalora_jax.quant import Quantizer, QTensor
from qalora_jax.quant.gptq import output_relative_error

# The block's linear layers in quantization order, grouped by the input they share.
STEPS = (("attn", ("q_proj", "k_proj", "v_proj")), ("attn", ("o_proj",)),
         ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
HELDOUT_PLAY = "romances/the-tempest"


# ------------------------------------------------------------------------------------------------ data


def _tokenized_plays(lm, corpus: str) -> dict[str, np.ndarray]:
  root = assets.fetch(corpus) if corpus in assets.ASSETS else Path(corpus)
  if not Path(root).is_dir():
    raise ValueError(f"corpus={corpus!r} is not supported; allowed: an asset name ({', '.join(assets.ASSETS)}) "
                     f"or a directory of <genre>/<play>.md files")
  return data.load_plays(root)


def calibration_tokens(lm, n_segments: int = 128, seq_len: int = 512, seed: int = 0,
                       corpus: str = "shakespeare") -> np.ndarray:
  """[n_segments, seq_len] int32: windows at uniformly random offsets (numpy Generator(seed)) of the training
  plays (every play but the held-out The Tempest) joined with EOS, as the training data is."""
  if not (isinstance(n_segments, (int, np.integer)) and n_segments > 0):
    raise ValueError(f"n_segments={n_segments!r} is not supported; allowed: a positive integer")
  if not (isinstance(seq_len, (int, np.integer)) and 1 < seq_len <= lm.config.max_seq_len):
    raise ValueError(f"seq_len={seq_len!r} is not supported; allowed: an integer in 2..{lm.config.max_seq_len}")
  train, _ = data.split_plays(_tokenized_plays(lm, corpus))
  eos = lm.config.eos_ids[0] if lm.config.eos_ids else 0
  stream = np.concatenate([np.append(np.asarray(lm.tokenizer.encode(text), np.int32), eos)
                           for text in train.values()])
  if len(stream) <= seq_len:
    raise ValueError(f"seq_len={seq_len} is longer than the corpus ({len(stream)} tokens)")
  starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, size=n_segments)
  return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)


def heldout_tokens(lm, n_tokens: int = 8192, corpus: str = "shakespeare") -> np.ndarray:
  """The first `n_tokens` tokens of the held-out play (The Tempest), for perplexity."""
  plays = _tokenized_plays(lm, corpus)
  if HELDOUT_PLAY not in plays:
    raise ValueError(f"corpus={corpus!r} has no {HELDOUT_PLAY}")
  return np.asarray(lm.tokenizer.encode(plays[HELDOUT_PLAY]), np.int32)[:n_tokens]


def check_tokens(config: Config, tokens) -> np.ndarray:
  """Validates calibration tokens [segments, seq_len]: enough tokens for a full-rank Hessian of the widest
  layer input (N >= max(hidden, intermediate, q_size)), within the context length and the vocabulary."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"calibration tokens must be an integer array [segments, seq_len], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if tokens.shape[1] > config.max_seq_len:
    raise ValueError(f"calibration seq_len={tokens.shape[1]} exceeds the context max_seq_len={config.max_seq_len}")
  if tokens.min() < 0 or tokens.max() >= config.vocab_size:
    raise ValueError(f"calibration tokens must lie in 0..{config.vocab_size - 1}")
  width = max(config.hidden_size, config.intermediate_size, config.q_size)
  if tokens.size < width:
    raise ValueError(f"calibration: {tokens.shape[0]} segments x {tokens.shape[1]} tokens = {tokens.size} tokens "
                     f"are too few for layers {width} inputs wide; allowed: at least {width} tokens "
                     f"(n_segments >= {-(-width // tokens.shape[1])} at seq_len={tokens.shape[1]}); 128 x 512 "
                     f"is the usual choice")
  return tokens.astype(np.int32)


# ------------------------------------------------------------------------------------ block, in steps


def _gram(x: jax.Array) -> jax.Array:
  """sum_n x_n x_n^T over every leading axis of x [..., d]."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return x.T @ x


@functools.partial(jax.jit, static_argnums=0)
def _step_qkv_input(config: Config, p, h):
  """Gram of x1 = norm(h)."""
  return _gram(layers.rms_norm(h, p["attn_norm"]["scale"], config.rms_eps))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: int | None = None,
                     query_block: int = 128) -> jax.Array:
  """softmax(q k^T / sqrt(d) + causal mask) v for full segments (no padding, positions 0..t-1), as
  `layers.attention` computes it, faster on CPU: KV heads repeated for their query heads, and each block of
  `query_block` queries scored only against the keys at or before its end (about 5/8 of the work at t = 512).
  q [b, t, heads, d], k and v [b, t, kv_heads, d] -> [b, t, heads, d]."""
  b, t, heads, d = q.shape
  k = jnp.repeat(k, heads // k.shape[2], axis=2)
  v = jnp.repeat(v, heads // v.shape[2], axis=2)
  outs = []
  for start in range(0, t, query_block):
    end = min(start + query_block, t)
    scores = jnp.einsum("bthd,bshd->bhts", q[:, start:end], k[:, :end],
                        preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    qpos, kpos = jnp.arange(start, end)[:, None], jnp.arange(end)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
      allowed = allowed & (qpos - kpos < sliding_window)
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bhts,bshd->bthd", probs, v[:, :end]))
  return jnp.concatenate(outs, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _step_attention(config: Config, p, h):
  """x2 = attention(q, k, v) of norm(h) (before o_proj), causal over each segment; and its Gram."""
  b, t, _ = h.shape
  x = layers.rms_norm(h, p["attn_norm"]["scale"], config.rms_eps)
  attn = p["attn"]
  q = layers.linear(x, attn["q_proj"]).reshape(b, t, config.num_heads, config.head_dim)
  k = layers.linear(x, attn["k_proj"]).reshape(b, t, config.num_kv_heads, config.head_dim)
  v = layers.linear(x, attn["v_proj"]).reshape(b, t, config.num_kv_heads, config.head_dim)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  cos, sin = layers.rope_angles(positions, rope_frequencies(config))
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  a = causal_attention(q, k, v, config.sliding_window).reshape(b, t, config.q_size)
  return a, _gram(a)


@functools.partial(jax.jit, static_argnums=0)
def _step_mlp_input(config: Config, p, h, a):
  """h2 = h + o_proj(x2), and the Gram of x3 = norm(h2)."""
  h2 = h + layers.linear(a, p["attn"]["o_proj"])
  return h2, _gram(layers.rms_norm(h2, p["mlp_norm"]["scale"], config.rms_eps))


@functools.partial(jax.jit, static_argnums=0)
def _step_down_input(config: Config, p, h2):
  """x4 = silu(gate(x3)) * up(x3), and its Gram."""
  x = layers.rms_norm(h2, p["mlp_norm"]["scale"], config.rms_eps)
  act = jax.nn.silu(layers.linear(x, p["mlp"]["gate_proj"])) * layers.linear(x, p["mlp"]["up_proj"])
  return act, _gram(act)


@jax.jit
def _step_output(p, h2, act):
  """The block's output h2 + down_proj(x4)."""
  return h2 + layers.linear(act, p["mlp"]["down_proj"])


def _chunked(fn, arrays, batch: int):
  """Applies fn to consecutive chunks of `batch` segments of every array; returns (concatenated outputs or
  None, summed Gram) where fn returns (output, gram), or gram alone."""
  n = arrays[0].shape[0]
  outs, total = [], None
  for start in range(0, n, batch):
    result = fn(*[a[start:start + batch] for a in arrays])
    out, gram = result if isinstance(result, tuple) else (None, result)
    if out is not None:
      outs.append(out)
    total = gram if total is None else total + gram
  return (jnp.concatenate(outs) if outs else None), total


# ----------------------------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class CalibrationStats:
  """Per-layer output errors (path -> [L]) of the quantized block linears on their calibration inputs."""

  layer_errors: dict[str, np.ndarray]
  tokens: int
  seconds: float

  @property
  def output_rel_error(self) -> float:
    """Mean over all linear layers of ||X W - X W~||^2 / ||X W||^2."""
    return float(np.mean(np.concatenate([e for e in self.layer_errors.values()])))


def _quantize(quantizer: Quantizer, w, h) -> QTensor:
  if quantizer.needs_calibration:
    return quantizer.quantize_with_hessian(w, h)
  return quantizer.quantize(w)


def quantize_model(config: Config, params: dict, tokens, quantizer: Quantizer, *, batch_segments: int = 8,
                   progress: bool = True) -> tuple[dict, CalibrationStats]:
  """The frozen tree (the 7 linears of every block as QTensors; norms, embeddings and head unchanged), in the
  layout of `models.quantize_params` (stacked [L, ...] leaves; per-layer in, per-layer out), and the
  per-layer output errors. Blocks run in sequence, each on the outputs of the already quantized ones."""
  tokens = check_tokens(config, tokens)
  per_layer = llama.is_per_layer(params["blocks"])
  block_params = [llama.layer_slice(params["blocks"], i) for i in range(config.num_layers)]
  for p in block_params[:1]:
    for group, names in STEPS:
      for name in names:
        kernel = p[group][name]["kernel"]
        if isinstance(kernel, QTensor) or kernel.ndim != 2:
          raise ValueError(f"blocks/{group}/{name}/kernel: calibration needs float [in, out] kernels")
        quantizer.check_shape(tuple(kernel.shape))
  start = time.perf_counter()
  cfg = config.replace(dtype="float32")
  h = llama.embed(cfg, params, jnp.asarray(tokens))
  errors = {f"blocks/{g}/{n}/kernel": [] for g, names in STEPS for n in names}
  out_blocks = []
  for i in tqdm(range(config.num_layers), desc=f"calibrating {type(quantizer).__name__}", disable=not progress):
    p = jax.tree.map(lambda x: x, block_params[i])  # a copy whose kernels are replaced step by step

    def quantize_step(group, names, gram):
      hess = (2.0 / tokens.size) * gram
      for name in names:
        w = p[group][name]["kernel"].astype(jnp.float32)
        qt = _quantize(quantizer, w, hess)
        errors[f"blocks/{group}/{name}/kernel"].append(float(output_relative_error(w, qt.dequantize(), hess)))
        p[group] = {**p[group], name: {**p[group][name], "kernel": qt}}

    _, gram = _chunked(functools.partial(_step_qkv_input, cfg, p), [h], batch_segments)
    quantize_step(*STEPS[0], gram)
    a, gram = _chunked(functools.partial(_step_attention, cfg, p), [h], batch_segments)
    quantize_step(*STEPS[1], gram)
    h2, gram = _chunked(functools.partial(_step_mlp_input, cfg, p), [h, a], batch_segments)
    quantize_step(*STEPS[2], gram)
    act, gram = _chunked(functools.partial(_step_down_input, cfg, p), [h2], batch_segments)
    quantize_step(*STEPS[3], gram)
    del a
    h, _ = _chunked(lambda x, y: (_step_output(p, x, y), jnp.zeros(())), [h2, act], batch_segments)
    del h2, act
    out_blocks.append(p)
  blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *out_blocks)
  frozen = {**params, "blocks": blocks}
  if per_layer:
    frozen = llama.unstack_blocks(frozen)
  stats = CalibrationStats({k: np.asarray(v) for k, v in errors.items()}, int(tokens.size),
                           time.perf_counter() - start)
  return frozen, stats
