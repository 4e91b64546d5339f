"""Data-driven quantization: run the model block by block on calibration tokens and quantize each block's
linear layers with the Hessians of their inputs (GPTQ), or with any other quantizer while measuring the
same output error.

    tokens = calibration_tokens(lm, n_segments=128, seq_len=512, seed=0)   # [128, 512] from the training plays
    frozen, stats = quantize_model(lm.config, lm.params, tokens, quant.get("gptq", bits=4, group_size=128))
    stats.output_rel_error                                                  # mean over the linear layers

Order ("true sequential", as AutoGPTQ): within block l the linears are quantized in the order the block's own
forward pass calls them, those sharing an input together, each step's inputs computed with everything before it
already quantized. For a LLaMA block that is four steps:

    1. q, k, v_proj  on  x1 = norm(h_l)                      (one input, one Hessian)
    2. o_proj        on  x2 = attention(q~, k~, v~)
    3. gate, up_proj on  x3 = norm(h_l + x2 W~_o)             (one input, one Hessian)
    4. down_proj     on  x4 = silu(x3 W~_gate) * (x3 W~_up)

and block l + 1 starts from h_{l+1} = h_l + x2 W~_o + x4 W~_down, the output of the quantized block l. The
inputs are captured inside the block's nn.Linear modules (`nn.calibrate.calibrate_sequential`), so there is
no second copy of the block here. Each step accumulates H = (2 / N) sum_n x_n x_n^T over the N = segments x
seq_len calibration tokens.
A quantizer that calibrates (`needs_calibration`: GPTQ) gets H; any other quantizes the weight alone. For both, the
output error of each layer on the inputs it sees in the quantized model,

    ||X W - X W~||^2 / ||X W||^2 = tr(D^T H D) / tr(W^T H W),   D = W - W~,

is read off H (no second pass over X) and reported per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qalora_jax import data
from qalora_jax.models import layers, llama
from qalora_jax.models.config import Config, rope_frequencies
from qalora_jax.nn.adapt_model import quantize_kernel
from qalora_jax.nn.calibrate import calibrate_sequential
from qalora_jax.nn.modules import Frozen, adapted_layers
from qalora_jax.quant import Quantizer, QTensor
from qalora_jax.quant.gptq import output_relative_error

def calibration_tokens(lm, n_segments: int = 128, seq_len: int = 512, seed: int = 0, corpus: str = "shakespeare",
                       heldout=data.HELDOUT_PLAYS) -> np.ndarray:
  """[n_segments, seq_len] int32: windows at uniformly random offsets (numpy Generator(seed)) of the training
  plays (every play but the held-out ones) joined with EOS, as the training data is."""
  if not (isinstance(n_segments, (int, np.integer)) and n_segments > 0):
    raise ValueError(f"n_segments={n_segments!r} is not supported; allowed: a positive integer")
  if not (isinstance(seq_len, (int, np.integer)) and 1 < seq_len <= lm.config.max_seq_len):
    raise ValueError(f"seq_len={seq_len!r} is not supported; allowed: an integer in 2..{lm.config.max_seq_len}")
  train, _ = data.split_plays(data.tokenized_plays(corpus, lm.tokenizer), tuple(heldout))
  eos = lm.config.eos_ids[0] if lm.config.eos_ids else 0
  stream = np.concatenate([np.append(ids, eos) for ids in train.values()]).astype(np.int32)
  if len(stream) <= seq_len:
    raise ValueError(f"seq_len={seq_len} is longer than the corpus ({len(stream)} tokens)")
  starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, size=n_segments)
  return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)


def heldout_tokens(lm, n_tokens: int = 8192, corpus: str = "shakespeare", heldout=data.HELDOUT_PLAYS) -> np.ndarray:
  """The first `n_tokens` tokens of the held-out plays (The Tempest by default), for perplexity."""
  _, held = data.split_plays(data.tokenized_plays(corpus, lm.tokenizer), tuple(heldout))
  return np.concatenate(list(held.values()))[:n_tokens]


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


def _run_block(block: llama.Block, batch):
  """One calibration chunk through a decoder block: batch = (h, cos, sin, mask) of full causal segments."""
  h, cos, sin, mask = batch
  return block(h, cos, sin, mask, None, 0)[0]


@functools.partial(jax.jit, static_argnums=0)
def _block_output(graphdef, state, batch):
  return _run_block(nnx.merge(graphdef, state), batch)


def quantize_model(config: Config, params: dict, tokens, quantizer: Quantizer, *, batch_segments: int = 8,
                   progress: bool = True) -> tuple[dict, CalibrationStats]:
  """The frozen tree (the 7 linears of every block as QTensors; norms, embeddings and head unchanged), in the
  layout of `models.quantize_params` (stacked [L, ...] leaves; per-layer in, per-layer out), and the
  per-layer output errors. Blocks run in sequence, each on the outputs of the already quantized ones; within a
  block, `nn.calibrate.calibrate_sequential` captures each linear's inputs from the block's own forward pass
  in `batch_segments`-segment chunks."""
  tokens = check_tokens(config, tokens)
  per_layer = llama.is_per_layer(params["blocks"])
  cfg = config.replace(dtype="float32", matmul_dtype=None, remat=False)
  model = llama.decoder(cfg, llama.unstack_blocks(params))
  for path, layer in adapted_layers(model.blocks[0]):
    kernel = layer.kernel.get_value()
    if isinstance(kernel, QTensor) or kernel.ndim != 2:
      raise ValueError(f"blocks/{path}/kernel: calibration needs float [in, out] kernels")
    quantizer.check_shape(tuple(kernel.shape))
  start = time.perf_counter()
  seq = tokens.shape[1]
  chunks = []
  for s in range(0, tokens.shape[0], batch_segments):
    segment = jnp.asarray(tokens[s:s + batch_segments])
    positions = jnp.broadcast_to(jnp.arange(seq), segment.shape)
    cos, sin = layers.rope_angles(positions, rope_frequencies(cfg))
    mask = llama.attention_mask(cfg, jnp.ones(segment.shape, bool), 0)
    chunks.append((model.embed(segment, jnp.float32), cos, sin, mask))
  errors: dict[str, list[float]] = {}
  for block in tqdm(model.blocks, desc=f"calibrating {type(quantizer).__name__}", disable=not progress):
    linears = dict(adapted_layers(block))

    def quantize(path, hessian, linears=linears):
      w = linears[path].kernel.get_value().astype(jnp.float32)
      qt = quantize_kernel(quantizer, w, f"blocks/{path}/kernel", hessian)
      errors.setdefault(f"blocks/{path}/kernel", []).append(float(output_relative_error(w, qt.dequantize(), hessian)))
      linears[path].kernel = Frozen(qt)

    calibrate_sequential(block, linears, chunks, _run_block, quantize)
    graphdef, state = nnx.split(block)
    chunks = [(_block_output(graphdef, state, chunk), *chunk[1:]) for chunk in chunks]
  frozen = llama.params_of(model)
  if not per_layer:
    frozen = llama.stack_blocks(frozen)
  stats = CalibrationStats({k: np.asarray(v) for k, v in errors.items()}, int(tokens.size),
                           time.perf_counter() - start)
  return frozen, stats
