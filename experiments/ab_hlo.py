"""Whether a change altered the computation: the compiled (optimized) HLO of the benchmarked programs of two
versions of the code, compared by instruction counts per opcode. Equal counts mean XLA runs the same program,
so any difference `ab_bench.py` shows is the machine's noise.

    python experiments/ab_hlo.py --old addac0c [--out experiments/perf/ab_hlo.md]

Programs: the training step of `qalora bench train --method {lora,qlora,qalora}` (SmolLM2-135M, 4 x 128,
bfloat16 matmuls) and the greedy decoding loop of `qalora bench decode --method qalora-merged` (int8
activations, 32-token prompt, 64 new tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from versions import ROOT, checkout, print_table, run_json

# Prints {"instructions": n, "ops": {opcode: n}} of the program named by argv[1].
PROGRAM = r'''
import collections, re
import jax, jax.numpy as jnp
from qalora_jax import bench, models
from qalora_jax.models import generation, llama
from qalora_jax.train import experiment

what = sys.argv[1]
if what == "decode":
  lm = models.load("smollm2-135m")
  params = llama.unstack_blocks(bench.decode_params("qalora-merged", lm))
  config = lm.config.replace(eos_ids=(), matmul_dtype="int8")
  lowered = generation.sample.lower(config, params, jnp.zeros((1, 32), jnp.int32), jnp.ones((1, 32), bool),
                                    jax.random.PRNGKey(0), jnp.float32(1.0), jnp.float32(1.0), max_new_tokens=64,
                                    greedy=True)
else:
  r = experiment.build(bench.train_config(what, "smollm2-135m", 4, 128, "float32", False, "bfloat16"),
                       log=lambda m: None)
  if hasattr(r, "make_step"):
    init, step = r.make_step()
  else:  # before the NNX decoder
    from qalora_jax.train.step import make_train_step
    init, step = make_train_step(r.nll, r.optimizer)
  tokens = jnp.zeros((4, 129), jnp.int32)
  lowered = jax.jit(step, donate_argnums=0).lower(init(r.trainable), r.frozen,
                                                  {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                                                  jax.random.PRNGKey(0))
text = lowered.compile().as_text()
ops = collections.Counter(m.group(1) for m in (re.search(r"= \S+ ([a-z][a-z\-]*)\(", line)
                                               for line in text.splitlines()) if m)
print(json.dumps({"instructions": sum(ops.values()), "ops": dict(sorted(ops.items()))}))
'''


def counts(tree: Path, what: str) -> dict:
  return run_json(tree, PROGRAM, what)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--old", required=True, help="the git revision to compare against")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = [f"Compiled HLO of the benchmarked programs, old = {args.old}, new = this checkout.", "",
          "| program | instructions old | instructions new | opcodes whose counts differ |", "|---|---:|---:|---|"]
  with checkout(args.old) as old:
    for what in ("lora", "qlora", "qalora", "decode"):
      a, b = counts(old, what), counts(ROOT, what)
      differ = sorted(k for k in a["ops"].keys() | b["ops"].keys() if a["ops"].get(k) != b["ops"].get(k))
      name = "decode qalora-merged" if what == "decode" else f"train {what}"
      changes = ", ".join(f"{k} {a['ops'].get(k, 0)} -> {b['ops'].get(k, 0)}" for k in differ) or "none"
      rows.append(f"| {name} | {a['instructions']:,} | {b['instructions']:,} | {changes} |")
      print(rows[-1], flush=True)
  print_table(rows, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
