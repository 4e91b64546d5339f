"""Exact resume on SmolLM2-135M: one QA-LoRA run of N steps uninterrupted, one killed with SIGKILL at a
random step after its first checkpoint and restarted; prints the largest adapter difference and whether the
logged losses agree.

    python experiments/exact_resume.py [--steps 40] [--out runs/exact-resume]
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from qalora_jax.train import experiment


def train(workdir, steps, checkpoint_every):
  return [sys.executable, "-m", "qalora_jax.cli", "train", "--config", "configs/quickstart.py", "--workdir",
          str(workdir), f"--config.steps={steps}", f"--config.checkpoint_every={checkpoint_every}",
          "--config.sample_prompt="]


def losses(workdir):
  return [(d["step"], d["loss"]) for d in map(json.loads, open(Path(workdir) / "metrics.jsonl")) if "loss" in d]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--out", default="runs/exact-resume")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  every = max(1, args.steps // 4)
  t0 = time.time()
  subprocess.run(train(out / "uninterrupted", args.steps, every), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  proc = subprocess.Popen(train(out / "killed", args.steps, every), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = out / "killed" / "checkpoints" / str(every)
  while not first.exists() and proc.poll() is None:
    time.sleep(0.1)
  rng = random.Random(args.seed)
  time.sleep(rng.uniform(0, 2 * 3.0 * every))  # a random point within the next two checkpoint intervals
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max((int(p.name) for p in (out / "killed" / "checkpoints").iterdir() if p.name.isdigit()), default=0)
  subprocess.run(train(out / "killed", args.steps, every), check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  _, a, _ = experiment.restore(out / "uninterrupted", log=lambda m: None)
  _, b, _ = experiment.restore(out / "killed", log=lambda m: None)
  diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  ra = json.loads((out / "uninterrupted" / "result.json").read_text())
  rb = json.loads((out / "killed" / "result.json").read_text())
  print(json.dumps({"steps": args.steps, "killed_after_checkpoint": killed_at, "max_abs_adapter_diff": diff,
                    "losses_equal": losses(out / "uninterrupted") == losses(out / "killed"),
                    "ppl": [ra["ppl"], rb["ppl"]], "merged_ppl": [ra["merged_ppl"], rb["merged_ppl"]],
                    "wall_s": round(time.time() - t0)}))


if __name__ == "__main__":
  main()
