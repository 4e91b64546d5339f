"""The quickstart: QA-LoRA on SmolLM2-135M with an INT4 g32 base, r = 16, on Shakespeare, 100 steps of 4 x 128
tokens. Prints held-out perplexity before, after and merged, and a sample before and after.

    qalora train --config configs/quickstart.py --workdir runs/quickstart
"""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"steps": 100} | parse_arg(arg)
  c = base_config()
  c.base.quantizer = "int"
  c.base.options = {"bits": 4, "group_size": 32}
  c.model.matmul_dtype = "bfloat16"  # mixed precision: the weight matmuls in bfloat16, accumulated in float32
  c.adapter.method = "qalora"
  c.adapter.rank = 16
  c.adapter.alpha = 32.0
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10
  c.steps = args["steps"]
  c.checkpoint_every = 40
  c.log_every = 10
  c.sample_prompt = "ROMEO:"
  c.sample_tokens = 32
  return c
