"""QA-LoRA on a `pow2-int` base, a quantizer defined outside the package (pow2int.py, next to this file):
`config.imports` names the module, which registers the quantizer before the config is validated.

    qalora train --config experiments/custom_quantizer/config.py --workdir runs/pow2-tiny
    qalora train --config experiments/custom_quantizer/config.py:model=smollm2,steps=100 --workdir runs/pow2-smollm2
    qalora eval --workdir runs/pow2-tiny --merged

get_config("model=tiny") (default: the tests' random 2-block model, seconds on CPU) | "model=smollm2" (SmolLM2-135M
on Shakespeare, the quickstart's recipe); also bits, group_size and steps.
"""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"model": "tiny", "bits": 4, "steps": 12} | parse_arg(arg)
  group_size = args.get("group_size", 16 if args["model"] == "tiny" else 32)
  c = base_config()
  # Relative to the working directory (the repository root), like the config path itself; config.json records
  # it, so `qalora eval` / `qalora merge` of the run import the quantizer again.
  c.imports = ("experiments/custom_quantizer/pow2int.py",)
  c.base.quantizer = "pow2-int"
  c.base.options = {"bits": args["bits"], "group_size": group_size}
  c.adapter.method = "qalora"
  c.steps = args["steps"]
  if args["model"] == "tiny":
    c.model.name = "tiny"
    c.data.seq_len = 32
    c.data.batch_size = 4
    c.data.eval_tokens = 512
    c.adapter.rank = 4
    c.adapter.alpha = 8.0
    c.log_every = c.checkpoint_every = 4
    c.optim.learning_rate = 1e-2
  elif args["model"] == "smollm2":
    c.adapter.rank = 16
    c.adapter.alpha = 32.0
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 10
    c.checkpoint_every = 40
  else:
    raise ValueError(f"model={args['model']!r} is not supported; allowed: tiny, smollm2")
  return c
