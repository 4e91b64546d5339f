"""QLoRA on SmolLM2-135M + Shakespeare: NF4 base with double quantization, float LoRA adapters."""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"rank": 16, "steps": 100, "double_quant": True} | parse_arg(arg)
  c = base_config()
  c.base.quantizer = "nf4"
  c.base.options = {"block_size": 64, "double_quant": args["double_quant"]}
  c.adapter.method = "lora"
  c.adapter.rank = args["rank"]
  c.steps = args["steps"]
  return c
