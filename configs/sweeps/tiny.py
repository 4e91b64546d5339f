"""The tests' sweep: LoRA, QLoRA and QA-LoRA on the tiny random model, QA-LoRA at two bit widths.

    qalora sweep --config configs/sweeps/tiny.py --workdir runs/sweep-tiny && qalora table --workdir runs/sweep-tiny
"""

from qalora_jax.train.config import parse_arg


def get_sweep(arg=None):
  args = {"steps": 8} | parse_arg(arg)
  return {
      "config": "configs/tiny.py",
      "overrides": {"steps": args["steps"], "checkpoint_every": 2, "log_every": 2},
      "cells": [
          {"name": "LoRA", "adapter.method": "lora", "base.quantizer": "none", "base.options": {}},
          {"name": "QLoRA", "adapter.method": "lora", "base.quantizer": "nf4",
           "base.options": {"block_size": 32, "double_quant": True}},
          {"name": "QA-LoRA 4-bit", "base.options": {"bits": 4, "group_size": 16}},
          {"name": "QA-LoRA 2-bit", "base.options": {"bits": 2, "group_size": 16}},
      ],
      "tables": [{"title": "held-out perplexity", "rows": "name", "value": ["base_ppl", "ppl", "merged_ppl"]},
                 {"title": "merged perplexity by bits", "rows": "method", "columns": "bits", "value": "merged_ppl",
                  "file": "by_bits"}],
  }
