"""Forward and greedy-decoding throughput of SmolLM2-135M (fp32) on this machine.

    python experiments/bench_models.py [--model smollm2-135m] [--repeats 5]

Prints forward tokens/s at batch 4 x 128 and greedy decoding tokens/s at batch 1 (32-token prompt, 64 new
tokens), each the median of `repeats` timed runs after one compiling run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import models
from qalora_jax.bench import median_seconds
from qalora_jax.models import generation as gen
from qalora_jax.models import llama


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--prompt-tokens", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  args = parser.parse_args()

  lm = models.load(args.model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, lm.config.vocab_size, (args.batch, args.seq)), jnp.int32)
  fwd = median_seconds(lambda: llama.apply_jit(lm.config, lm.params, tokens), args.repeats, warmup=1)

  prompt = rng.integers(3, lm.config.vocab_size, (1, args.prompt_tokens)).astype(np.int32)
  mask = jnp.ones(prompt.shape, bool)
  # Generation without end-of-sequence tokens, so that every run produces exactly new_tokens.
  config = lm.config.replace(eos_ids=())
  params = llama.unstack_blocks(lm.params)  # the layout generate_tokens decodes with

  def decode():
    out, _ = gen.sample(config, params, jnp.asarray(prompt), mask, jax.random.PRNGKey(0), jnp.float32(1.0),
                        jnp.float32(1.0), max_new_tokens=args.new_tokens, greedy=True)
    out.block_until_ready()

  dec = median_seconds(decode, args.repeats, warmup=1)
  print(f"device: {jax.devices()[0].device_kind}, model: {args.model}, dtype: {lm.config.dtype}")
  print(f"forward  batch {args.batch} x {args.seq}: {args.batch * args.seq / fwd:8.1f} tokens/s "
        f"({fwd * 1e3:.1f} ms per batch, median of {args.repeats})")
  print(f"greedy decoding batch 1, {args.prompt_tokens}-token prompt + {args.new_tokens} new: "
        f"{args.new_tokens / dec:8.1f} tokens/s ({dec * 1e3:.0f} ms, prefill included, median of {args.repeats})")


if __name__ == "__main__":
  main()
