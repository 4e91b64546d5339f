"""QA-LoRA on a `pow2-int` base, a quantizer defined outside the package (pow2int.py, next to this file):
`config.imports` names the module, which registers the quantizer before the config is validated.

    qalora train --config experiments/custom_quantizer/config.py:runlocal --workdir runs/pow2-tiny
    qalora train --config experiments/custom_quantizer/config.py:steps=100 --workdir runs/pow2-smollm2
    qalora eval --workdir runs/pow2-tiny --merged

SmolLM2-135M on Shakespeare with the quickstart's recipe; `runlocal` shrinks it to the tests' random 2-block
model (seconds on CPU). Also bits, group_size and steps.
"""

from qalora_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  args = {"bits": 4, "group_size": 32, "steps": 100} | parse_arg(arg)
  c = base_config()
  # Relative to the working directory (the repository root), like the config path itself; config.json records
  # it, so `qalora eval` / `qalora merge` of the run import the quantizer again.
  c.imports = ("experiments/custom_quantizer/pow2int.py",)
  c.base.quantizer = "pow2-int"
  c.base.options = {"bits": args["bits"], "group_size": args["group_size"]}
  c.adapter.method = "qalora"
  c.adapter.rank = 16
  c.adapter.alpha = 32.0
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10
  c.steps = args["steps"]
  c.checkpoint_every = 40
  return c
