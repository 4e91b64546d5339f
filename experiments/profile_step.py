"""Where a training step's time goes on the CPU: jax.profiler's trace of the compiled step, each XLA thunk
classified by the optimized HLO as a matmul (its fusion holds a dot or convolution), a custom call (our own
kernels: the CPU attention) or other, summed over the threads that ran it.

    python experiments/profile_step.py --method qalora --batch 4 --seq 128 [--matmul-dtype float32] [--remat]
        [--steps 3] [--top 15]

Prints the step time, the matmul / other split, the time by output shape (a leading axis of the layer count
is a scan's stacked buffer), and the slowest thunks of each kind. Times are thread time per step: on 2 cores
two thunks can run at once, so the sum exceeds the step's wall time. The process restarts itself with glibc's
large blocks in huge pages, as `qalora` does (hardware.restart_with_huge_pages): without them the first touch of
each step's fresh buffers faults 4 KB pages (about 136,000 a step at 4 x 128), and that time lands on whichever
thunk touches a buffer first, mostly the zero-fill of the scan's stacked residuals.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import bench, hardware
from qalora_jax.train import experiment


def _callees(line: str) -> list[str]:
  return re.findall(r"calls=%?([\w.\-]+)", line)


def thunk_kinds(hlo: str) -> dict[str, tuple[str, str]]:
  """{instruction name: ("matmul" | "custom call" | "other", output shape)} over every computation of an HLO
  module's text; a custom call is a kernel of our own (the CPU attention)."""
  bodies, current = {}, None
  for line in hlo.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      bodies[current] = []
    elif current:
      bodies[current].append(line)

  def has_dot(name, seen):
    if name in seen or name not in bodies:
      return False
    seen.add(name)
    return any(re.search(r" (dot|convolution)\(", line) or any(has_dot(c, seen) for c in _callees(line))
               for line in bodies[name])

  kinds = {}
  for lines in bodies.values():
    for line in lines:
      # the shape is one array's, or a tuple's (a multi-output fusion, a custom call with several results)
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\(", line)
      if m:
        name, shape, op = m.groups()
        dot = op in ("dot", "convolution") or any(has_dot(c, set()) for c in _callees(line))
        kind = "matmul" if dot else "custom call" if op == "custom-call" else "other"
        kinds[name] = (kind, re.sub(r"\{[^{}]*\}", "", shape))
  return kinds


def main() -> None:
  hardware.restart_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="qalora", choices=bench.TRAIN_METHODS)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--matmul-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  cfg = bench.train_config(args.method, "smollm2-135m", args.batch, args.seq, "float32", args.remat, args.matmul_dtype)
  exp = experiment.build(cfg, log=lambda m: None)
  init, step = exp.make_step()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, exp.lm.config.vocab_size, (args.batch, args.seq + 1)),
                       jnp.int32)
  data, key = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, jax.random.PRNGKey(0)
  state = init(exp.trainable)
  compiled = jax.jit(step, donate_argnums=0).lower(state, exp.frozen, data, key).compile()
  kinds = thunk_kinds(compiled.as_text())
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, exp.frozen, data, key)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        state, metrics = compiled(state, exp.frozen, data, key)
      jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  by_thunk, calls = collections.Counter(), collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          by_thunk[event.name] += event.duration_ns / 1e6 / args.steps
          calls[event.name] += 1
  by_kind, by_shape = collections.Counter(), collections.Counter()
  for name, ms in by_thunk.items():
    kind, shape = kinds[name]
    by_kind[kind] += ms
    by_shape[(kind, shape)] += ms
  print(f"{args.method} {args.batch} x {args.seq}, {args.matmul_dtype} matmuls{', remat' if args.remat else ''}: "
        f"{seconds:.3f} s a step; "
        f"thread time a step: " + ", ".join(f"{k} {v:.0f} ms" for k, v in by_kind.most_common()))
  print("\n| kind | output shape | ms a step |\n|---|---|---:|")
  for (kind, shape), ms in by_shape.most_common(args.top):
    print(f"| {kind} | {shape} | {ms:.1f} |")
  for want in ("matmul", "custom call", "other"):
    print(f"\n| {want} thunk | output shape | calls a step | ms a step |\n|---|---|---:|---:|")
    for name, ms in [(n, v) for n, v in by_thunk.most_common() if kinds[n][0] == want][:args.top]:
      print(f"| {name} | {kinds[name][1]} | {calls[name] // args.steps} | {ms:.1f} |")


if __name__ == "__main__":
  main()
