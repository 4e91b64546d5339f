"""QA-LoRA merge exactness on SmolLM2-135M: train a few real steps (B != 0), then compare the logits and
held-out perplexity of the unmerged model (base + adapter branch) with the merged one (adapters folded into
the INT-k offsets), for INT4 / INT3 / INT2 g32 bases with float32 and with float16 scales and offsets.

    python experiments/merge_exactness.py [--steps 5] [--bits 4 3 2]

Prints one JSON line per setting: max |logit difference| / max |logit| and the two perplexities.
"""

import argparse
import json
import time

import jax.numpy as jnp

from qalora_jax import models, nn
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
  parser.add_argument("--scale-dtype", nargs="+", default=["float32", "float16"])
  args = parser.parse_args()
  for bits in args.bits:
    for scale_dtype in args.scale_dtype:
      t0 = time.time()
      cfg = config_lib.load("configs/quickstart.py", [f"--config.base.options.bits={bits}",
                                                      f"--config.base.options.scale_dtype={scale_dtype}"])
      r = experiment.build(cfg, log=lambda m: None)
      state, held = loop.train_steps(r, args.steps)
      b_norm = float(sum(jnp.abs(a.b).max() for _, a in nn.trees.adapter_layers(r.adapters(state.trainable))))
      unmerged, merged = r.params(state.trainable), r.merged(state.trainable)
      tokens = jnp.asarray(held[: 4 * 128].reshape(4, 128))
      lu, lm_ = r.apply(unmerged, tokens), r.apply(merged, tokens)
      rel = float(jnp.abs(lu - lm_).max() / jnp.abs(lu).max())
      ppl_u = models.perplexity(r.lm, held[:4096], window=512, params=unmerged)
      ppl_m = models.perplexity(r.lm, held[:4096], window=512, params=merged)
      print(json.dumps({"bits": bits, "group_size": 32, "scale_dtype": scale_dtype, "steps": args.steps,
                        "sum_max_abs_B": b_norm, "max_abs_logit_diff_over_max_logit": rel,
                        "max_abs_logit_diff": float(jnp.abs(lu - lm_).max()), "ppl_unmerged": ppl_u,
                        "ppl_merged": ppl_m, "ppl_rel_change": ppl_m / ppl_u - 1,
                        "merged_bytes_equal": nn.tree_nbytes(merged) == nn.tree_nbytes(r.frozen),
                        "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
