"""Tunes the Pallas INT4 kernel's blocks on a GPU, in one command of about 5 minutes.

For each decoding shape (one row: a token; 16 rows: a short prompt) every tiling that fits is timed: block_n,
block_k, split-K slices, the dot-free single-row form (block_m = 1) against the 16-row dot; then Triton's warps
and pipeline stages for the fastest few. Each candidate's output is checked against float32 x @ W~ (relative
error below 1e-2 with bfloat16 operands) before its time counts. Last, the chosen blocks against XLA's
dequantize-then-dot at 32, 64 and 128 rows: where the kernel stops paying (`KERNEL_MAX_ROWS`).

Timing is check.py's: each timed program runs the product on enough copies of the weight to exceed the L2
cache four times, median of 5 repetitions; GB/s counts the packed weight (codes, scales, offsets) plus x and y
against the copy bandwidth measured first. JSON lines go to tune.jsonl, the table to summary.md, under --out.

  python experiments/gpu/tune_int4.py --out $OUT [--budget 330]
  python experiments/gpu/tune_int4.py --dry-run --out runs/gpu-tune-dry   # CPU, tiny shapes, interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gpu_check", HERE / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check  # dataclasses look their module up there
_spec.loader.exec_module(check)

ERROR_LIMIT = 1e-2  # bfloat16 operands: W~ rounded to 8 bits, sums in float32
CROSSOVER_ROWS = (32, 64, 128)
WARPS_STAGES = ((2, 3), (4, 2), (4, 4), (8, 3), (8, 4))


@dataclasses.dataclass
class Case:
  """One shape to tune: W~ [n_in, n_out] at group_size, m rows, forward or dx (transpose), a time share."""

  n_in: int
  n_out: int
  group_size: int
  m: int
  transpose: bool
  seconds: float

  @property
  def name(self) -> str:
    return f"{self.n_in}x{self.n_out} g{self.group_size} m={self.m}{' dx' if self.transpose else ''}"


def cases(dry: bool) -> list[Case]:
  if dry:
    return [Case(128, 64, 32, 1, False, 30), Case(128, 64, 32, 1, True, 30)]
  big, tall = check.LAYER_8B, (14336, 4096)
  return [Case(*big, 32, 1, False, 45), Case(*tall, 32, 1, False, 40), Case(*big, 32, 1, True, 35),
          Case(*big, 128, 1, False, 20), Case(*big, 32, 16, False, 25),
          *(Case(*s, 32, 1, False, 14) for s in check.SMOLLM2)]


def candidates(qt, m: int, transpose: bool, dry: bool) -> list:
  """Every tiling that fits with 4 warps and 3 stages, 2 to 16 KB of codes a step and 32 to 4096 programs, those
  nearest 400 programs (about three a multiprocessor) first."""
  from qalora_jax.kernels.int4_matmul import Blocks, blocks_fit

  reduce, width = (qt.shape[1], qt.shape[0]) if transpose else qt.shape
  found = []
  for block_m in ((1, 16) if m == 1 else (16,)):
    for block_n in (32, 64, 128, 256):
      for block_k in (32, 64, 128, 256, 512):
        for splits in (1, 2, 3, 4, 6, 8, 9, 12, 16):
          b = Blocks(block_m, block_n, block_k, splits, warps=4, stages=3)
          programs = -(-m // block_m) * (width // block_n) * splits
          code_bytes = block_n * block_k // 2
          sized = 32 <= programs <= 4096 and 2048 <= code_bytes <= 16384
          if blocks_fit(qt, b, transpose=transpose) and (dry or sized):
            found.append((abs(math.log(programs / 400)), b))
  found.sort(key=lambda t: t[0])
  return [b for _, b in found][:3 if dry else None]


class Tuner:
  def __init__(self, out: Path, dry: bool, budget: float):
    self.out, self.dry = out, dry
    self.start = time.time()
    self.deadline = self.start + budget
    out.mkdir(parents=True, exist_ok=True)
    self.log = open(out / "tune.jsonl", "a")
    self.copy_bw = None
    self.summary: list[tuple[str, str]] = []

  def record(self, **fields) -> dict:
    row = {"t": round(time.time() - self.start, 2), **fields}
    self.log.write(json.dumps(row) + "\n")
    self.log.flush()
    print(json.dumps(row), flush=True)
    return row

  def measure_copy(self) -> None:
    import jax
    import jax.numpy as jnp

    n = 2 ** 20 if self.dry else 2 ** 30
    x = jnp.zeros((n,), jnp.bfloat16)
    t = check.seconds_per_call(jax.jit(lambda x: x + 1), x)
    self.copy_bw = 2 * x.nbytes / t
    self.record(what="copy", gb_s=self.copy_bw / 1e9, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), jax=jax.__version__)

  def time_op(self, op, x, qts) -> float:
    import jax

    many = jax.jit(lambda x, qts: [op(x, qt) for qt in qts])
    return check.seconds_per_call(many, x, qts, reps=3 if self.dry else 5, inner=2) / len(qts)

  def figures(self, seconds: float, moved: int) -> dict:
    row = {"us": seconds * 1e6, "gb_s": moved / seconds / 1e9}
    if self.copy_bw:
      row["copy_fraction"] = moved / seconds / self.copy_bw
    return row

  def tune(self, case: Case, rng) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qalora_jax.kernels.int4_matmul import choose_blocks, int4_matmul

    stop = min(self.deadline, time.time() + case.seconds)
    one = check.random_int4(case.n_in, case.n_out, case.group_size, seed=0)
    count = 2 if self.dry else max(2, min(64, math.ceil(4 * check.L2_BYTES / one.nbytes)))
    qts = [one] + [check.random_int4(case.n_in, case.n_out, case.group_size, seed=s) for s in range(1, count)]
    reduce, width = (case.n_out, case.n_in) if case.transpose else (case.n_in, case.n_out)
    x = jnp.asarray(rng.normal(size=(case.m, reduce)), jnp.bfloat16)
    w = one.dequantize(jnp.float32)
    with jax.default_matmul_precision("highest"):
      want = np.asarray(x.astype(jnp.float32) @ (w.T if case.transpose else w), np.float64)
    moved = one.nbytes + x.nbytes + case.m * width * 2
    xla = self.figures(self.time_op(lambda x, qt: check.xla_matmul(x, qt, case.transpose), x, qts), moved)
    default = choose_blocks(case.m, one, transpose=case.transpose)
    results = []  # (us, blocks)

    def trial(blocks, phase: str) -> None:
      op = lambda x, qt: int4_matmul(x, qt, transpose=case.transpose, blocks=blocks, interpret=self.dry)  # noqa: E731
      row = {"what": "trial", "case": case.name, "phase": phase, "blocks": dataclasses.asdict(blocks)}
      try:
        with check.time_limit(30):
          error = check.relative_error(op(x, one), want)
          row["rel_error"] = error
          if error < ERROR_LIMIT:
            row["kernel"] = self.figures(self.time_op(op, x, qts), moved)
            row["xla_over_kernel"] = xla["us"] / row["kernel"]["us"]
            results.append((row["kernel"]["us"], blocks))
      except Exception as e:  # noqa: BLE001 - a tiling Triton rejects is a result too
        row["error"] = check.short(e)[:400]
      self.record(**row)

    self.record(what="case", case=case.name, copies=len(qts), xla=xla,
                default=dataclasses.asdict(default) if default else None)
    if default is not None:
      trial(default, "default")
    tried = {default}
    pool = candidates(one, case.m, case.transpose, self.dry)
    reserve = 0.3 * (stop - time.time())  # for warps and stages
    for blocks in pool:
      if time.time() > stop - reserve:
        break
      if blocks not in tried:
        tried.add(blocks)
        trial(blocks, "tiling")
    best = sorted(results, key=lambda t: t[0])[:3]
    for _, blocks in best:
      for warps, stages in WARPS_STAGES[:1] if self.dry else WARPS_STAGES:
        variant = dataclasses.replace(blocks, warps=warps, stages=stages)
        if time.time() > stop:
          break
        if variant not in tried:
          tried.add(variant)
          trial(variant, "warps-stages")
    if not results:
      self.summary.append((case.name, f"no tiling ran; XLA {xla['us']:.1f} us"))
      return
    us, blocks = min(results, key=lambda t: t[0])
    default_us = next((u for u, b in results if b == default), float("nan"))
    frac = moved / (us * 1e-6) / self.copy_bw if self.copy_bw else float("nan")
    self.record(what="best", case=case.name, blocks=dataclasses.asdict(blocks), us=us, default_us=default_us,
                xla_us=xla["us"], copy_fraction=frac, tried=len(tried))
    b = blocks
    self.summary.append((case.name, f"best {b.block_m}x{b.block_n}x{b.block_k} split {b.splits} warps {b.warps} "
                         f"stages {b.stages}: {us:.1f} us ({100 * frac:.0f}% of copy); chosen now "
                         f"{default_us:.1f} us; XLA {xla['us']:.1f} us ({len(tried)} tried)"))

  def crossover(self, rng) -> None:
    """The chosen blocks against XLA at CROSSOVER_ROWS rows, forward, every SmolLM2 shape and the 8B layer."""
    import jax.numpy as jnp

    from qalora_jax.kernels.int4_matmul import choose_blocks, int4_matmul

    shapes = [(128, 64)] if self.dry else [*check.SMOLLM2, check.LAYER_8B]
    for m in CROSSOVER_ROWS[:1] if self.dry else CROSSOVER_ROWS:
      ratios = []
      for n_in, n_out in shapes:
        if time.time() > self.deadline - 3:
          self.summary.append((f"crossover m={m}", "skipped (time)"))
          return
        one = check.random_int4(n_in, n_out, 32, seed=0)
        count = 2 if self.dry else max(2, min(64, math.ceil(4 * check.L2_BYTES / one.nbytes)))
        qts = [one] + [check.random_int4(n_in, n_out, 32, seed=s) for s in range(1, count)]
        x = jnp.asarray(rng.normal(size=(m, n_in)), jnp.bfloat16)
        try:
          with check.time_limit(30):
            k = self.time_op(lambda x, qt: int4_matmul(x, qt, interpret=self.dry), x, qts)
            xl = self.time_op(lambda x, qt: check.xla_matmul(x, qt), x, qts)
        except Exception as e:  # noqa: BLE001
          self.record(what="crossover", shape=[n_in, n_out], m=m, error=check.short(e)[:400])
          continue
        ratios.append(xl / k)
        self.record(what="crossover", shape=[n_in, n_out], m=m, kernel_us=k * 1e6, xla_us=xl * 1e6,
                    xla_over_kernel=xl / k, blocks=dataclasses.asdict(choose_blocks(m, one)))
      if ratios:
        self.summary.append((f"crossover m={m}", "XLA / kernel " + ", ".join(f"{r:.2f}" for r in ratios)
                             + f" ({', '.join(f'{a}x{b}' for a, b in shapes)})"))

  def write_summary(self) -> str:
    rows = [("case", "result"), ("---", "---"), *self.summary]
    text = "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    (self.out / "summary.md").write_text(text)
    print("\n" + text, flush=True)
    return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="folder for tune.jsonl and summary.md (default: $OUT, else "
                      "runs/gpu-tune)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, the kernel in interpret mode")
  parser.add_argument("--budget", type=float, default=None, help="seconds in all (default: 330; dry run 90)")
  args = parser.parse_args(argv)
  out = Path(args.out or os.environ.get("OUT") or "runs/gpu-tune")
  check.install_carried_wheels()
  sys.path.insert(0, str(check.ROOT))
  if args.dry_run:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np

  tuner = Tuner(out, args.dry_run, args.budget or (90.0 if args.dry_run else 330.0))
  if not args.dry_run and jax.default_backend() not in ("gpu", "cuda"):
    tuner.record(what="error", error=f"no GPU: JAX's backend is {jax.default_backend()!r} (use --dry-run)")
    return 1
  tuner.measure_copy()
  rng = np.random.default_rng(0)
  for case in cases(args.dry_run):
    if time.time() > tuner.deadline - 5:
      tuner.summary.append((case.name, "skipped (time)"))
      continue
    try:
      tuner.tune(case, rng)
    except Exception as e:  # noqa: BLE001 - one case's failure does not stop the others
      tuner.record(what="error", case=case.name, error=check.short(e))
      tuner.summary.append((case.name, f"error: {check.short(e)[:150]}"))
  tuner.crossover(rng)
  tuner.record(what="end", seconds=time.time() - tuner.start)
  tuner.write_summary()
  return 0


if __name__ == "__main__":
  sys.exit(main())
