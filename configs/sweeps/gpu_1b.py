"""GPU sweep on a 1B-class model (configs/gpu_1b.py): QA-LoRA's rank, bit width and group size, with LoRA and
QLoRA beside it at the config's r = 16. The same command as the CPU sweeps (configs/sweeps/tiny.py, paper.py); the
config differs.

    qalora sweep --config configs/sweeps/gpu_1b.py:model=/data/Llama-3.2-1B --workdir runs/gpu-1b-sweep
    qalora table --workdir runs/gpu-1b-sweep

arg: model (required), steps (default 1000); local=true runs the same cells on the tiny random model.
"""

from qalora_jax.train.config import parse_arg


def get_sweep(arg=None):
  args = {"model": "", "steps": 1000, "local": False} | parse_arg(arg)
  config = f"configs/gpu_1b.py:model={args['model']},local={args['local']}"
  group_sizes, ranks = ((16,), (4, 8)) if args["local"] else ((32, 64, 128), (16, 64))  # tiny: 64-wide layers
  qalora = [{"name": f"QA-LoRA {b}-bit g{g} r{r}", "adapter.rank": r, "adapter.alpha": 2.0 * r,
             "base.options": {"bits": b, "group_size": g}}
            for b in (4, 2) for g in group_sizes for r in ranks if g == group_sizes[0] or r == ranks[0]]
  lora = {"adapter.method": "lora", "base.quantizer": "none", "base.options": {}}
  qlora = {"adapter.method": "lora", "base.quantizer": "nf4",
           "base.options": {"block_size": 32 if args["local"] else 64, "double_quant": True}}
  return {
      "config": config,
      "overrides": {"steps": args["steps"]} if not args["local"] else {},
      "cells": [{"name": "LoRA", **lora}, {"name": "QLoRA", **qlora}, *qalora],
      "tables": [{"title": "held-out perplexity", "rows": "name", "value": ["base_ppl", "ppl", "merged_ppl"]},
                 {"title": "time per step and tokens per second", "rows": "name",
                  "value": ["step_s", "tokens_per_s"], "file": "speed"}],
  }
