"""LoRA on SmolLM2-135M + Shakespeare: float32 base, float adapters."""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"rank": 16, "steps": 100} | parse_arg(arg)
  c = base_config()
  c.base.quantizer = "none"
  c.base.options = {}
  c.adapter.method = "lora"
  c.adapter.rank = args["rank"]
  c.steps = args["steps"]
  return c
