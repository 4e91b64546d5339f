"""The training step's matmuls alone, XLA's (and in float32 kernels.cpu_gemm's) against PyTorch's, at the step's
shapes and operand dtypes, and the float32 results' error against float64.

    python experiments/matmul_shapes.py [--rounds 5] [--out experiments/perf]

SmolLM2-135M at 4 x 128 tokens (M = 512 rows): each linear's forward product x W ([M, in] x [in, out]) and its
input gradient dy W^T ([M, out] x [in, out]^T), and the head's (its table [vocabulary, d]), per chunk of 8,192
entries (six a step). Each product is timed as a jitted `jnp.dot` (float32 accumulation) and as `torch.matmul`, in
the same process with as many threads as cores, with float32 and with bfloat16 operands, and with float32 as
kernels.cpu_gemm's product with the weight quantized as the step stores it (INT4 g32, the head's 8-bit table:
its dequantization is in the figure), with AVX512 FMAs and, on a CPU with AMX, on its tiles; the libraries
alternate within each round. A figure is the median of its rounds' GFLOP/s. The "step" row weights every shape
by the times a step runs it,

    t = sum over shapes of  count x 2 M K N / rate,

the time the step's matmuls alone would take with each library's products, the rest of the step left out.
The float32 rows bound the all-float32 comparison with PEFT: the peer's step runs its products at PyTorch's
rate, ours at cpu_gemm's (XLA's where the kernel does not run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import hardware
from qalora_jax.bench import median_seconds
from qalora_jax.files import write_bytes

ROOT = Path(__file__).resolve().parents[1]
M, D, KV, FFN, LAYERS, VOCAB_CHUNK, CHUNKS = 512, 576, 192, 1536, 30, 8192, 6

# (name, K, N, transposed, times a step): transposed products contract with the weight's output axis
SHAPES = [
    ("q, o forward", D, D, False, 2 * LAYERS),
    ("q, o input gradient", D, D, True, 2 * LAYERS),
    ("k, v forward", D, KV, False, 2 * LAYERS),
    ("k, v input gradient", KV, D, True, 2 * LAYERS),
    ("gate, up forward", D, FFN, False, 2 * LAYERS),
    ("gate, up input gradient", FFN, D, True, 2 * LAYERS),
    ("down forward", FFN, D, False, LAYERS),
    ("down input gradient", D, FFN, True, LAYERS),
    ("head logits, one chunk", D, VOCAB_CHUNK, True, CHUNKS),  # the table is vocabulary-first
    ("head input gradient, one chunk", VOCAB_CHUNK, D, False, CHUNKS),
]


def _seconds(fn, min_s: float = 0.2) -> float:
  """Median seconds of one call, over enough calls to fill about `min_s` (after one warm-up call)."""
  fn()
  t0 = time.perf_counter()
  fn()
  return median_seconds(fn, max(3, int(min_s / max(time.perf_counter() - t0, 1e-6))))


def operands(k: int, n: int, transposed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """x [M, k] and w ([n, k] when transposed, else [k, n]) in float32, and x w in float64."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((M, k)).astype(np.float32)
  w = rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32)
  w64 = np.asarray(w, np.float64)
  return x, w, np.asarray(x, np.float64) @ (w64.T if transposed else w64)


def xla_product(k: int, n: int, transposed: bool, dtype: str):
  """A call running [M, k] x [k, n] (the weight stored [n, k] when transposed) through XLA."""
  x, w, _ = operands(k, n, transposed)
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  f = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))
  return lambda: f(x, w).block_until_ready()


def ours_product(name: str, k: int, n: int, transposed: bool, amx: bool):
  """The same product in kernels.cpu_gemm with the weight quantized as the step stores it (float32 only): INT4
  g32 for a linear (its input gradient the kernel's transposed product), the 8-bit table [576, vocabulary] for
  the head (its logits x W~, its input gradient the transposed product); on AMX's tiles or with AVX512 FMAs.
  Returns the call and its float64 reference, x W~."""
  from qalora_jax import quant
  from qalora_jax.kernels import cpu_gemm

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((M, k)), jnp.float32)
  head = name.startswith("head")
  shape = (k, n) if head == transposed else (n, k)  # the weight as [in, out] for cpu_gemm
  qt = quant.get("int", bits=8 if head else 4, group_size=32).quantize(
      rng.standard_normal(shape).astype(np.float32) * 0.05)
  w = np.asarray(qt.dequantize(jnp.float32), np.float64)
  f = jax.jit(lambda x, qt: cpu_gemm.matmul(x, qt, transpose=head != transposed))
  before = os.environ.get("QALORA_CPU_AMX")
  os.environ["QALORA_CPU_AMX"] = "1" if amx else "0"  # read when the call is traced: now
  f(x, qt).block_until_ready()
  os.environ.pop("QALORA_CPU_AMX") if before is None else os.environ.update(QALORA_CPU_AMX=before)
  return (lambda: f(x, qt).block_until_ready()), np.asarray(x, np.float64) @ (w.T if head != transposed else w)


def torch_product(k: int, n: int, transposed: bool, dtype: str):
  import torch

  x, w, _ = operands(k, n, transposed)
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  x, w = torch.from_numpy(x).to(tdtype), torch.from_numpy(w).to(tdtype)
  return (lambda: x @ w.t()) if transposed else (lambda: x @ w)


def error(got, want: np.ndarray) -> float:
  """The largest error over the largest entry."""
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def step_ms(rates: dict[str, float]) -> float:
  """Milliseconds the step's matmuls take at `rates` (GFLOP/s by shape name)."""
  return sum(count * 2 * M * k * n / (rates[name] * 1e9) for name, k, n, _, count in SHAPES) * 1e3


LABELS = {"xla": "XLA", "ours": "ours (AVX512)", "ours-amx": "ours (AMX)", "torch": "torch"}


def tables(lines: list[dict]) -> str:
  med, err = {}, {}
  for x in lines:
    med.setdefault((x["shape"], x["library"], x["dtype"]), []).append(x["gflop_s"])
    if "error" in x:
      err[(x["shape"], x["library"])] = x["error"]
  med = {key: statistics.median(v) for key, v in med.items()}
  f32 = [lib for lib in LABELS if (SHAPES[0][0], lib, "float32") in med]  # torch last
  rounds = len({x["round"] for x in lines})
  c = lines[0]["cpu"]
  out = [f"The SmolLM2-135M training step's matmuls at 4 x 128 tokens, alone: GFLOP/s, median of {rounds} rounds, "
         f"{c['cores']} threads. CPU: {c['model']}, {c['cores']} cores, {' '.join(c['flags'])}. "
         "`python experiments/matmul_shapes.py`.", "",
         "| product | [M, K] x [K, N] | a step | " + " | ".join(f"{LABELS[lib]} f32" for lib in f32) + " | "
         + " | ".join(f"{LABELS[lib]} / torch" for lib in f32[:-1]) + " | XLA bf16 | torch bf16 | XLA / torch |",
         "|---|---|---:|" + "---:|" * (2 * len(f32) - 1) + "---:|---:|---:|"]
  for name, k, n, _, count in SHAPES:
    rates = [med[(name, lib, "float32")] for lib in f32]
    cells = [f"{r:.0f}" for r in rates] + [f"{r / rates[-1]:.2f}x" for r in rates[:-1]]
    x, t = med[(name, "xla", "bfloat16")], med[(name, "torch", "bfloat16")]
    cells += [f"{x:.0f}", f"{t:.0f}", f"{x / t:.2f}x"]
    out.append(f"| {name} | [{M}, {k}] x [{k}, {n}] | {count} | " + " | ".join(cells) + " |")
  ms = {(lib, dtype): step_ms({name: med[(name, lib, dtype)] for name, *_ in SHAPES})
        for lib, dtype in [*((lib, "float32") for lib in f32), ("xla", "bfloat16"), ("torch", "bfloat16")]}
  times = [ms[(lib, "float32")] for lib in f32]
  cells = [f"{v:.0f} ms" for v in times] + [f"{times[-1] / v:.2f}x" for v in times[:-1]]
  bf16 = [ms[(lib, "bfloat16")] for lib in ("xla", "torch")]
  cells += [f"{v:.0f} ms" for v in bf16] + [f"{bf16[1] / bf16[0]:.2f}x"]
  out.append("| the step's matmuls, time (x / torch: torch's time over x's) | | | " + " | ".join(cells) + " |")
  if err:
    out += ["", "Float32 results against float64 (the largest error over the largest entry of the product; ours with "
            "the quantized weight, the others with a float32 one):", "",
            "| product | " + " | ".join(LABELS[lib] for lib in f32) + " |", "|---|" + "---:|" * len(f32)]
    out += [f"| {name} | " + " | ".join(f"{err[(name, lib)]:.1e}" for lib in f32) + " |" for name, *_ in SHAPES]
  return "\n".join(out) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default=str(ROOT / "experiments" / "perf"))
  args = parser.parse_args()
  import torch

  from qalora_jax.kernels import cpu_library

  torch.set_num_threads(os.cpu_count())
  makers = {"xla": xla_product, "torch": torch_product}
  calls = {(name, lib, dtype): makers[lib](k, n, transposed, dtype)
           for name, k, n, transposed, _ in SHAPES for dtype in ("float32", "bfloat16") for lib in makers}
  ours = {"ours": False, **({"ours-amx": True} if cpu_library.amx() else {})}
  errors = {}
  for name, k, n, transposed, _ in SHAPES:
    want = operands(k, n, transposed)[2]
    errors.update({(name, lib): error(calls[(name, lib, "float32")](), want) for lib in makers})
    for lib, amx in ours.items():
      calls[(name, lib, "float32")], want = ours_product(name, k, n, transposed, amx)
      errors[(name, lib)] = error(calls[(name, lib, "float32")](), want)
  lines = []
  for r in range(args.rounds):
    for name, k, n, _, _ in SHAPES:
      for dtype in ("float32", "bfloat16"):
        libs = ("xla", *ours, "torch") if dtype == "float32" else ("xla", "torch")
        for lib in (libs if r % 2 == 0 else libs[::-1]):
          s = _seconds(calls[(name, lib, dtype)])
          lines.append({"round": r, "shape": name, "library": lib, "dtype": dtype, "m": M, "k": k, "n": n,
                        "gflop_s": 2 * M * k * n / s / 1e9, "cpu": hardware.cpu(),
                        **({"error": errors[(name, lib)]} if dtype == "float32" else {})})
    print(f"round {r + 1}/{args.rounds} done", flush=True)
  text = tables(lines)
  print(text)
  out = Path(args.out)
  write_bytes(out / "matmul_shapes.md", text.encode())
  write_bytes(out / "matmul_shapes.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())


if __name__ == "__main__":
  main()
