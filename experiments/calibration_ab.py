"""GPTQ calibration of SmolLM2-135M by two versions of the code, in one session: mean output error, held-out
perplexity and time.

    python experiments/calibration_ab.py --old addac0c [--bits 4 --group-size 32 --segments 32]
        [--out experiments/perf/calibration_ab.md]

Three runs, each in a fresh process: the old tree; this checkout; and this checkout with the old tree's
query-blocked causal attention in place of the model's attention (the only arithmetic the two
versions do differently when calibrating), which separates what the attention's float rounding does to GPTQ
from what the rest of the change does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from versions import ROOT, checkout, print_table, run_json

# argv: the old tree, whether to use its attention ("1"), bits, group size, segments.
PROGRAM = r'''
old, blocked, bits, group, segments = sys.argv[1], sys.argv[2] == "1", *map(int, sys.argv[3:6])
import jax, jax.numpy as jnp
if blocked:  # the old tree's calibration attention, in place of the model's own
  source = open(f"{old}/qalora_jax/calibration.py").read()
  start = source.index("def causal_attention(")
  namespace = {"jax": jax, "jnp": jnp}
  exec(source[start:source.index("\n\n\n", start)], namespace)
  from qalora_jax.models import llama
  model_attention = llama.attention
  llama.attention = lambda q, k, v, mask: namespace["causal_attention"](q, k, v)  # full causal segments only
from qalora_jax import calibration, models, quant
lm = models.load("smollm2-135m")
tokens = calibration.calibration_tokens(lm, segments, 512, 0)
held = calibration.heldout_tokens(lm, 8192)
frozen, stats = calibration.quantize_model(lm.config, lm.params, tokens, quant.get("gptq", bits=bits, group_size=group),
                                           progress=False)
if blocked:
  llama.attention = model_attention  # evaluate with the model's own attention
ppl = models.perplexity(lm, held, window=512, params=frozen)
print(json.dumps({"output_rel_error": stats.output_rel_error, "ppl": ppl, "seconds": stats.seconds}))
'''


def run(tree: Path, old: Path, blocked: bool, args) -> dict:
  return run_json(tree, PROGRAM, str(old), "1" if blocked else "0", str(args.bits), str(args.group_size),
                  str(args.segments), env={"OPENBLAS_NUM_THREADS": "1"})


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--old", required=True)
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--group-size", type=int, default=32)
  p.add_argument("--segments", type=int, default=32)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = [f"GPTQ {args.bits}-bit g{args.group_size} on SmolLM2-135M, {args.segments} x 512 calibration tokens "
          f"(seed 0); perplexity on the first 8,192 Tempest tokens, 512-token windows. old = {args.old}.", "",
          "| code | mean output error | perplexity | calibration s |", "|---|---:|---:|---:|"]
  with checkout(args.old) as old:
    for name, tree, blocked in (("old", old, False), ("new", ROOT, False),
                                ("new, with the old calibration attention", ROOT, True)):
      r = run(tree, old, blocked, args)
      rows.append(f"| {name} | {r['output_rel_error']:.10e} | {r['ppl']:.3f} | {r['seconds']:.0f} |")
      print(rows[-1], flush=True)
  print_table(rows, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
