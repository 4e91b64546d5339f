"""The tests' config: configs/<method>.py shrunk by `runlocal` (a tiny random LLaMA, seconds on CPU).

    get_config("method=lora") | "method=qlora" | "method=qalora" (default); also steps=N
    (the same as configs/<method>.py:runlocal)
"""

from pathlib import Path

from qalora_jax.checks import check_choice
from qalora_jax.train.config import call_file, parse_arg, runlocal


def get_config(arg=None):
  args = {"method": "qalora", "steps": 12} | parse_arg(arg)
  check_choice("method", args["method"], ("lora", "qlora", "qalora"))
  c = call_file(str(Path(__file__).with_name(f"{args['method']}.py")), "get_config", "config")
  runlocal(c, steps=args["steps"])
  return c
