"""QA-LoRA on four base quantizers, SmolLM2-135M + Shakespeare (held-out perplexity on The Tempest):
`int` (min-max RTN), `int-mse` (MSE-clipped range), `gptq` (calibrated) and `nf-offset` (NF-k codebook with a
per-group offset), at 4 and 3 bits, group size 32. All four merge exactly into their offsets, so the merged
model stays in its base format.

    qalora sweep --config configs/sweeps/quantizers.py --workdir experiments/quantizers
    qalora table --workdir experiments/quantizers

Beside the table and the plot: which orderings hold beyond 2 standard deviations of a single run, and the
wall times.

Same budget and seeds as configs/sweeps/paper.py: every cell once per seed (arg: seeds=N, default 3: seeds
0..N-1), `steps` steps of 4 x 128 tokens (arg: steps=N), AdamW at 5e-4 with 5 warm-up steps, r = 16 on all
seven linears, alpha 32; GPTQ calibrates on 32 x 512 tokens of the training plays drawn with
base.calibration_seed (its bases are cached, shared with the paper sweep's QA-LoRA g32 cells).
"""

from qalora_jax.train.config import parse_arg

BITS = (4, 3)
GROUP_SIZE = 32
QUANTIZERS = ("int", "int-mse", "gptq", "nf-offset")


def name(quantizer, bits):
  return f"QA-LoRA {quantizer} {bits}-bit"


def get_sweep(arg=None):
  args = {"steps": 50, "seeds": 3} | parse_arg(arg)
  cells = [{"name": name(q, b), "base.quantizer": q, "base.options": {"bits": b, "group_size": GROUP_SIZE}}
           for q in QUANTIZERS for b in BITS]
  metrics = {"base": "base_ppl", "tuned": "ppl", "merged": "merged_ppl"}
  table = {
      "title": f"QA-LoRA per base quantizer (g{GROUP_SIZE}): held-out perplexity of the base before tuning, "
               "of the tuned model (adapters unmerged) and of the merged model",
      "file": "quantizers", "corner": "quantizer",
      "columns": [f"{b}-bit {m}" for b in BITS for m in metrics],
      "layout": [{"row": q, "cells": {f"{b}-bit {m}": [name(q, b), metric] for b in BITS
                                      for m, metric in metrics.items()}} for q in QUANTIZERS],
  }
  orderings = {
      "title": "The orderings the README states: which hold beyond 2 standard deviations", "file": "orderings",
      "compare": [[name(a, b), "merged_ppl", name(c, b), "merged_ppl"]
                  for b in BITS for a, c in (("int", "gptq"), ("int-mse", "gptq"), ("int", "int-mse"),
                                             ("int", "nf-offset"), ("gptq", "nf-offset"))]
      + [[name(q, b), "merged_ppl", name(q, b), "base_ppl"] for q in QUANTIZERS for b in BITS],
  }
  wall_times = {"title": "Wall time of each cell (this machine; other work shared its cores)", "file": "wall_times",
                "rows": "name", "value": ["steps", "wall_s"]}
  plots = [
      {"file": "merged_ppl_vs_bits.png", "title": f"QA-LoRA merged perplexity vs bits (g{GROUP_SIZE})",
       "xlabel": "bits", "ylabel": "perplexity",
       "lines": [{"label": q, "points": [[b, name(q, b), "merged_ppl"] for b in BITS]} for q in QUANTIZERS]},
  ]
  return {
      "config": "configs/quickstart.py",
      "overrides": {"steps": args["steps"], "optim.warmup_steps": 5, "checkpoint_every": 25, "sample_prompt": "",
                    "base.calibration": 32, "base.calibration_len": 512},
      "seeds": list(range(args["seeds"])), "cells": cells, "tables": [table, orderings, wall_times], "plots": plots,
  }
