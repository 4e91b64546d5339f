"""`qalora bench` of two versions of the code, alternately in one session: a change's speed against the commit
before it, with the machine's noise falling on both sides alike.

    python experiments/ab_bench.py --old addac0c [--rounds 3] [--out experiments/perf/ab.md]

Each round runs every benchmark once with the old tree (a `git worktree` of --old, imported first) and once
with this checkout, each in a fresh process. Prints a Markdown table of the medians over rounds and of the
ratio new / old taken within each round, and writes it (with the raw JSON lines) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from versions import ROOT, checkout, run_json

from qalora_jax import hardware
from qalora_jax.files import write_bytes

BENCHES = {
    "train lora": ["train", "--method", "lora"],
    "train qlora": ["train", "--method", "qlora"],
    "train qalora": ["train", "--method", "qalora"],
    "train qalora remat": ["train", "--method", "qalora", "--remat"],
    "train qalora fp32": ["train", "--method", "qalora", "--matmul-dtype", "float32"],
    "train qalora remat 1x2048": ["train", "--method", "qalora", "--remat", "--batch", "1", "--seq", "2048"],
    "train qalora 3-bit g128": ["train", "--method", "qalora", "--bits", "3", "--group-size", "128"],
    "decode qalora-merged": ["decode", "--method", "qalora-merged"],
}


def run(tree: Path, args: list[str]) -> dict:
  """One `qalora bench` JSON line, with the code imported from `tree`, in a process with glibc's large blocks in
  huge pages as the `qalora` command restarts itself with (hardware.huge_page_environment)."""
  env = hardware.huge_page_environment(dict(os.environ)) or {}
  return run_json(tree, "import qalora_jax.cli as c; sys.exit(c.main(['bench', *sys.argv[1:]]))", *args, env=env)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--old", required=True, help="the git revision to compare against")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  names = [n for n in BENCHES if not args.only or n in args.only.split(",")]
  lines = []
  with checkout(args.old) as old:
    for r in range(args.rounds):
      for name in names:
        for side, tree in (("old", old), ("new", ROOT)) if r % 2 == 0 else (("new", ROOT), ("old", old)):
          result = {**run(tree, BENCHES[name]), "name": name, "side": side, "round": r}
          print(json.dumps(result), flush=True)
          lines.append(result)
  rows = [f"A/B of `qalora bench` (tokens/s; medians of {args.rounds} alternating rounds), old = {args.old}, "
          f"new = this checkout. CPU: {hardware.describe()}.", "",
          "| benchmark | old | new | new / old (per round) | compile s old / new |", "|---|---:|---:|---:|---:|"]
  for name in names:
    get = lambda side, key: [x[key] for x in lines if x["name"] == name and x["side"] == side]  # noqa: E731
    ratios = [n / o for o, n in zip(get("old", "tokens_per_s"), get("new", "tokens_per_s"))]
    rows.append(f"| {name} | {statistics.median(get('old', 'tokens_per_s')):.1f} | "
                f"{statistics.median(get('new', 'tokens_per_s')):.1f} | {statistics.median(ratios):.3f} "
                f"({', '.join(f'{x:.3f}' for x in ratios)}) | {statistics.median(get('old', 'compile_s')):.1f} / "
                f"{statistics.median(get('new', 'compile_s')):.1f} |")
  table = "\n".join(rows) + "\n"
  print(table)
  if args.out:
    out = Path(args.out)
    write_bytes(out, table.encode())
    write_bytes(out.with_suffix(".jsonl"), "".join(json.dumps(x) + "\n" for x in lines).encode())
  return 0


if __name__ == "__main__":
  sys.exit(main())
