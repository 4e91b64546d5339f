"""Benchmarks that print figures: `qalora bench train | decode | peaks`.

    qalora bench train --method qalora --batch 4 --seq 128      # one JSON line
    qalora bench decode --method qalora-merged --new-tokens 64

train: the jitted training step of LoRA (float base), QLoRA (NF4 + double quantization) or QA-LoRA (INT-k,
`bits` 2/3/4/8 and `group_size`, default INT4 g32), r = 16 on all seven linears, AdamW, on random token batches
(as the PyTorch peers in shared/bench).
tokens_per_s is batch x seq over the median of `repeats` timed steps after `warmup` steps; compile_s the
time to lower and compile the step; mfu = model FLOPs per second / the matmul peak of the step's products
measured in the same process (`matmul_peak_flops`: XLA's at the operand dtype, or the float32 products of
kernels.cpu_gemm where the step runs them, `gemm` "amx" or "avx512"), with the model FLOPs of a step on a frozen
base counted as forward + input gradients:

    flops/token = 2 x (2 (N_linear + V d) + 4 L t q_size)      (no weight gradients but the adapters')

(N_linear weights in the blocks' linears, V d the head, t the sequence length; 556 MFLOP for SmolLM2 at
t = 128, REFERENCE.md section 7). peak_rss_mb is the process's peak resident memory, model loading included.

decode: greedy decoding at batch 1 (a `prompt`-token random prompt, `new_tokens` new tokens, no early stop)
with fp32 weights, an NF4 + DQ base with unmerged LoRA adapters (QLoRA), or a merged QA-LoRA INT4 g32 model
(the same pure INT4 tree a merge produces), the token table and tied head float32 or (embedding "int8") 8-bit
codes per 32 inputs, as llama.cpp's Q8_0. bytes_per_token is the parameter bytes read per token (every
weight once); read_gb_s = bytes_per_token x tokens/s, against the read bandwidth measured in the process.
"""

from __future__ import annotations

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import hardware, models, nn, quant
from qalora_jax.kernels import cpu_gemm

TRAIN_METHODS = ("lora", "qlora", "qalora")
DECODE_METHODS = ("fp32", "qlora", "qalora-merged")
EMBEDDINGS = ("float", "int8")


def median_seconds(fn, repeats: int, warmup: int = 0) -> float:
  """Median wall seconds of `repeats` calls of fn (each waiting for its result), after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32", gemm: str = "xla") -> float:
  """FLOP/s of one n x n x n matmul here (median), operands of `dtype` accumulated in float32: XLA's, or with
  `gemm` "amx" or "avx512" kernels.cpu_gemm's with an INT4 g32 weight (the float32 products of a QA-LoRA step)."""
  if gemm == "xla":
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * n**3 / median_seconds(lambda: f(a, a), repeats, warmup=1)
  rng = np.random.default_rng(0)  # random values: the tiles' products draw more power on them than on ones
  x = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  w = quant.get("int", bits=4, group_size=32).quantize(rng.normal(size=(n, n)).astype(np.float32))
  f = jax.jit(cpu_gemm.matmul)
  return 2 * n**3 / median_seconds(lambda: f(x, w), repeats, warmup=1)


def read_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes/s of a reduction over an n_bytes float32 array (each byte read once)."""
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  return n_bytes / median_seconds(lambda: f(x), repeats, warmup=1)


def train_flops_per_token(config: models.Config, seq: int) -> float:
  """Model FLOPs per training token on a frozen base (see the module docstring)."""
  d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
  n_linear = config.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * f)
  forward = 2 * (n_linear + config.vocab_size * d) + 4 * config.num_layers * seq * q
  return 2.0 * forward


def machine() -> dict:
  """The fields every benchmark line carries: the JAX device and the CPU (model, cores, instruction flags)."""
  return {"device": jax.devices()[0].device_kind, "cpu": hardware.cpu()}


def _check(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"--{name} {value!r} is not supported; allowed: {', '.join(allowed)}")


def train_config(method: str, model: str, batch: int, seq: int, dtype: str, remat: bool,
                 matmul_dtype: str = "bfloat16", bits: int = 4, group_size: int = 32, remat_keep: str = ""):
  from qalora_jax.train.config import base_config, validate

  _check("method", method, TRAIN_METHODS)
  c = base_config()
  c.model.name, c.model.dtype, c.model.matmul_dtype, c.model.remat = model, dtype, matmul_dtype, remat
  c.model.remat_keep = remat_keep
  c.data.batch_size, c.data.seq_len = batch, seq
  c.adapter.rank, c.adapter.alpha = 16, 32.0
  if method == "lora":
    c.base.quantizer, c.base.options, c.adapter.method = "none", {}, "lora"
  elif method == "qlora":
    c.base.quantizer, c.base.options, c.adapter.method = "nf4", {"block_size": 64, "double_quant": True}, "lora"
  else:
    c.base.quantizer, c.base.options, c.adapter.method = "int", {"bits": bits, "group_size": group_size}, "qalora"
  validate(c)
  return c


def bench_train(method: str = "qalora", batch: int = 4, seq: int = 128, model: str = "smollm2-135m",
                dtype: str = "float32", remat: bool = False, warmup: int = 2, repeats: int = 5,
                matmul_dtype: str = "bfloat16", bits: int = 4, group_size: int = 32, remat_keep: str = "") -> dict:
  from qalora_jax.train import experiment

  cfg = train_config(method, model, batch, seq, dtype, remat, matmul_dtype, bits, group_size, remat_keep)
  exp = experiment.build(cfg, log=lambda m: None)
  init, step = exp.make_step()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, exp.lm.config.vocab_size, (batch, seq + 1)), jnp.int32)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  key = jax.random.PRNGKey(0)
  state = init(exp.trainable)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, exp.frozen, data, key).compile()
  compile_s = time.perf_counter() - t0
  hardware.trim_heap()  # as the training loop does after compiling
  flops = train_flops_per_token(exp.lm.config, seq) * batch * seq
  box = [state]

  def one():
    box[0], m = compiled(box[0], exp.frozen, data, key)
    return m["loss"]

  step_s = median_seconds(one, repeats, warmup)
  gemm = cpu_gemm.engine(matmul_dtype) if method == "qalora" and bits in (4, 8) else "xla"
  peak = matmul_peak_flops(dtype=matmul_dtype, gemm=gemm)
  return {"bench": "train", "method": method, "batch": batch, "seq": seq, "dtype": dtype,
          "matmul_dtype": matmul_dtype, "remat": remat, "remat_keep": remat_keep,
          **({"bits": bits, "group_size": group_size} if method == "qalora" else {}),
          "tokens_per_s": batch * seq / step_s, "step_s": step_s, "compile_s": compile_s,
          "peak_rss_mb": peak_rss_mb(), "step_gflop": flops / 1e9, "matmul_peak_gflop_s": peak / 1e9,
          "mfu": flops / step_s / peak, "gemm": gemm, **machine()}


def decode_params(method: str, lm: models.LanguageModel, embedding: str = "float") -> dict:
  """The parameter tree `method` decodes with (stacked blocks); embedding "int8" stores the token table (and
  so the tied head) in 8-bit rows (models.quantize.int8_table)."""
  _check("method", method, DECODE_METHODS)
  _check("embedding", embedding, EMBEDDINGS)
  params = _decode_params(method, lm)
  return models.quantize.int8_table(params) if embedding == "int8" else params


def _decode_params(method: str, lm: models.LanguageModel) -> dict:
  if method == "fp32":
    return lm.params
  key = jax.random.PRNGKey(0)
  if method == "qlora":
    frozen, _ = models.quantize_params(lm.params, quant.get("nf4", block_size=64, double_quant=True))
    return nn.combine(frozen, nn.add_adapters(frozen, "lora", rank=16, alpha=32.0, key=key))
  frozen, _ = models.quantize_params(lm.params, quant.get("int", bits=4, group_size=32))
  return nn.merge_params(frozen, nn.add_adapters(frozen, "qalora", rank=16, alpha=32.0, key=key))


def bench_decode(method: str = "qalora-merged", new_tokens: int = 64, prompt: int = 32,
                 model: str = "smollm2-135m", repeats: int = 5, matmul_dtype: str = "int8",
                 embedding: str = "float") -> dict:
  from qalora_jax.models import generation

  lm = models.tiny_model() if model == "tiny" else models.load(model)
  # No early stop: every run makes exactly new_tokens.
  config = lm.config.replace(eos_ids=(), matmul_dtype=matmul_dtype)
  params = generation.decoding_params(config, decode_params(method, lm, embedding))
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, prompt)).astype(np.int32)
  mask = jnp.ones(ids.shape, bool)

  def decode():
    out, _ = generation.sample(config, params, jnp.asarray(ids), mask, jax.random.PRNGKey(0), jnp.float32(1.0),
                               jnp.float32(1.0), max_new_tokens=new_tokens, greedy=True)
    return out

  t0 = time.perf_counter()
  jax.block_until_ready(decode())
  compile_s = time.perf_counter() - t0
  seconds = median_seconds(decode, repeats)
  bytes_per_token = nn.tree_nbytes(params)
  tokens_per_s = new_tokens / seconds
  from qalora_jax.kernels import cpu_matmul

  return {"bench": "decode", "method": method, "matmul_dtype": matmul_dtype, "embedding": embedding,
          "int8_kernel": matmul_dtype == "int8" and cpu_matmul.available(), "new_tokens": new_tokens,
          "prompt": prompt,
          "tokens_per_s": tokens_per_s, "compile_s": compile_s, "peak_rss_mb": peak_rss_mb(),
          "bytes_per_token": bytes_per_token, "read_gb_s": bytes_per_token * tokens_per_s / 1e9,
          "bandwidth_gb_s": read_bandwidth() / 1e9, **machine()}
