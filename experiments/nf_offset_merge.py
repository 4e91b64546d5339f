"""QA-LoRA merge exactness on an NF-with-offset base (SmolLM2-135M): the codebook grid is non-uniform, but the
per-group offset makes the merge exact all the same.

Builds SmolLM2 with an `nf-offset` base (NF4 by default, float32 scales and offsets), adds QA-LoRA adapters
(r = 16, all seven linears, configs/qalora.py), trains real steps on Shakespeare, then compares the logits of
the unmerged model (base + pooled adapter branch) with the merged one (s A B folded into the offsets) on
held-out tokens of The Tempest, and their held-out perplexities.

    python experiments/nf_offset_merge.py [--bits 4] [--group-size 32] [--steps 20] [--lr 5e-4]

Prints one JSON line: max |logit difference|, max |logit|, their ratio (the target is <= 1e-4), the
perplexities of the base, the unmerged and the merged model, and whether the merged model's storage equals
the base's.
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
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--group-size", type=int, default=32)
  parser.add_argument("--scale-dtype", default="float32")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--lr", type=float, default=5e-4)
  args = parser.parse_args()
  t0 = time.time()
  cfg = config_lib.load(f"configs/qalora.py:bits={args.bits},group_size={args.group_size}", [
      "--config.base.quantizer=nf-offset", f"--config.base.options.scale_dtype={args.scale_dtype}",
      f"--config.optim.learning_rate={args.lr}", f"--config.steps={args.steps}"])
  r = experiment.build(cfg, log=lambda m: None)
  state, held = loop.train_steps(r, args.steps)
  unmerged, merged = r.params(state.trainable), r.merged(state.trainable)
  tokens = jnp.asarray(held[: 4 * 128].reshape(4, 128))
  logits_unmerged, logits_merged = r.apply(unmerged, tokens), r.apply(merged, tokens)
  diff = float(jnp.abs(logits_unmerged - logits_merged).max())
  top = float(jnp.abs(logits_unmerged).max())
  ppl = {name: models.perplexity(r.lm, held[:4096], window=512, params=params)
         for name, params in (("base", r.base_params()), ("unmerged", unmerged), ("merged", merged))}
  print(json.dumps({
      "quantizer": "nf-offset", "bits": args.bits, "group_size": args.group_size, "scale_dtype": args.scale_dtype,
      "rank": cfg.adapter.rank, "steps": args.steps, "learning_rate": args.lr,
      "max_abs_B": max(float(jnp.abs(a.b).max()) for _, a in nn.trees.adapter_layers(r.adapters(state.trainable))),
      "max_abs_logit_diff": diff, "max_abs_logit": top, "ratio": diff / top,
      "ppl_base": ppl["base"], "ppl_unmerged": ppl["unmerged"], "ppl_merged": ppl["merged"],
      "merged_bytes_equal": nn.tree_nbytes(merged) == nn.tree_nbytes(r.frozen),
      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
  main()
