"""QA-LoRA on SmolLM2-135M + Shakespeare: INT-k group-wise base, adapters pooled over its groups.

    qalora train --config configs/qalora.py:bits=3,group_size=64 --workdir runs/qalora-int3-g64
"""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"bits": 4, "group_size": 32, "rank": 16, "steps": 100} | parse_arg(arg)
  c = base_config()
  c.base.quantizer = "int"
  c.base.options = {"bits": args["bits"], "group_size": args["group_size"]}
  c.adapter.method = "qalora"
  c.adapter.rank = args["rank"]
  c.steps = args["steps"]
  return c
