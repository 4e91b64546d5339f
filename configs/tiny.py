"""A tiny random LLaMA on a few lines of Shakespeare-like text: the config the tests run (seconds on CPU).

    get_config("method=lora") | "method=qlora" | "method=qalora" (default)
"""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"method": "qalora", "steps": 12} | parse_arg(arg)
  c = base_config()
  c.model.name = "tiny"
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.data.eval_tokens = 512
  c.adapter.rank = 4
  c.adapter.alpha = 8.0
  c.steps = args["steps"]
  c.log_every = 4
  c.checkpoint_every = 4
  c.optim.learning_rate = 1e-2
  if args["method"] == "lora":
    c.base.quantizer, c.base.options, c.adapter.method = "none", {}, "lora"
  elif args["method"] == "qlora":
    c.base.quantizer, c.base.options, c.adapter.method = "nf4", {"block_size": 32, "double_quant": True}, "lora"
  else:
    c.base.quantizer, c.base.options, c.adapter.method = "int", {"bits": 4, "group_size": 16}, "qalora"
  return c
