"""The GPU check: one command that measures what the framework does on a GPU, in stages.

    python experiments/gpu/check.py --out DIR             # on a GPU machine (at most about 6.5 minutes)
    python experiments/gpu/check.py --dry-run --out DIR   # the same stages on CPU, tiny shapes (tests run it)

It first installs the pure-Python wheels carried in experiments/gpu/wheels/ that the machine lacks (gguf and
ml-collections, which `qalora_jax.models` and the configs import), into a temporary folder. Then each stage
runs under its own time limit, appends JSON lines to DIR/check.jsonl as results come in, and records its
error and moves on if it fails; the end prints a summary table (also DIR/summary.md).

Stages (the numbers each one reports):
  env          versions and devices; the ceilings: a bf16 matrix product (2 n^3 FLOP / time) and a copy
               (y = x + 1 over a large bf16 array: bytes read + written / time).
  lowering     the INT4 kernel compiled through Triton (what base_matmul uses) and through Pallas' default GPU
               backend (Mosaic GPU); whether base_matmul's program holds the Triton kernel.
  correctness  the kernel's x W~ and dy W~^T against float64 (numpy, from the packed words) at m in {1, 5, 37}
               on SmolLM2-135M's linear shapes and a 4096 x 14336 layer, under default_matmul_precision
               ("highest"): ||y - y64|| / ||y64||; target 1e-5. Also bf16 operands (target 2^-8).
  microbench   kernel against XLA's dequantize-then-dot (base_matmul's other path) at m in {1, 16, 256, 4096}:
               microseconds, GB/s (weight + x + y bytes / time), TFLOP/s (2 m in out / time); each timing runs
               several copies of the weight in one program so that they do not sit in the L2 cache.
  train        one training step of a 1B-class LLaMA (random weights of LLaMA-3.2-1B's shapes, bf16, INT4 g32
               base) with LoRA and with QA-LoRA (r = 16 on every linear), 8 x 2048 tokens: seconds per step and
               MFU = counted FLOP / time / bf16 peak (measured in env, and the datasheet's). Counted: 2 N T for
               the forward matmuls and 2 N T for dx (a frozen base has no dW), N = the linears and the tied
               head; the adapters' 3 x forward; causal attention 6 B S^2 H d per layer (forward and backward).
  decode       batch-1 greedy decoding of the same model (INT4 g32, the per-layer layout generation uses), with
               the kernel and with XLA's path: ms per token, and bytes per token (every parameter, the tied
               head included, plus the whole KV cache) / time against the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().with_name("wheels")
CARRIED = ("gguf", "ml_collections")  # imported by qalora_jax, absent from the GPU machine's image
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM parts)
L2_BYTES = 60 * 2 ** 20  # an H200's L2 (a timing rotates over enough weights to exceed it several times)

# Shapes [in, out] and sizes; the dry run's are tiny.
SMOLLM2 = [(576, 576), (576, 192), (1536, 576), (576, 1536)]
LAYER_8B = (4096, 14336)
STAGE_SECONDS = {"env": 20, "lowering": 30, "correctness": 55, "microbench": 70, "train": 140, "decode": 45}


@dataclasses.dataclass
class Plan:
  """What each stage runs: the full sizes, or the dry run's."""

  dry: bool
  matmul_n: int
  copy_elements: int
  correctness_shapes: list
  correctness_rows: tuple
  micro_shapes: list
  micro_rows: tuple
  rank: int
  train_batch: tuple
  train_methods: tuple
  decode_tokens: tuple
  decode_paths: tuple

  @classmethod
  def make(cls, dry: bool) -> Plan:
    if dry:
      # one method and one decoding path: on CPU the other compiles the same program
      return cls(True, 256, 2 ** 20, [(128, 64)], (1, 37), [((128, 64), 32)], (1, 16), 2, (2, 32), ("qalora",),
                 (4, 8), ("kernel",))
    micro = [(s, 32) for s in SMOLLM2] + [(LAYER_8B, 32), (LAYER_8B, 128), ((14336, 4096), 32)]
    return cls(False, 8192, 2 ** 30, SMOLLM2 + [LAYER_8B], (1, 5, 37), micro, (1, 16, 256, 4096), 16, (8, 2048),
               ("lora", "qalora"), (16, 128), ("xla", "kernel"))


def install_carried_wheels() -> list[str]:
  """Installs the carried wheels of the modules this Python cannot import (into a temporary folder put on
  sys.path); returns the wheel names installed."""
  missing = [name for name in CARRIED if importlib.util.find_spec(name) is None]
  wheels = [w for w in sorted(WHEELS.glob("*.whl")) if any(w.name.startswith(name + "-") for name in missing)]
  if not wheels:
    return []
  target = Path(tempfile.gettempdir()) / "qalora-gpu-check-site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
  sys.path.insert(0, str(target))
  importlib.invalidate_caches()
  return [w.name for w in wheels]


class StageTimeout(Exception):
  """A stage ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
  """Raises StageTimeout in the main thread after `seconds` (when control is back in Python)."""
  def expire(signum, frame):
    raise StageTimeout(f"past the stage's limit of {seconds:.0f} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


class Check:
  """The run's state: the plan, where records go, the measured ceilings, the summary rows."""

  def __init__(self, plan: Plan, out: Path, budget: float):
    self.plan, self.out = plan, out
    self.start = time.time()
    self.deadline = self.start + budget
    self.stage_deadline = self.deadline
    self.ceilings: dict = {}
    self.summary: list[tuple[str, str, str]] = []
    self.cache: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    self.log = open(out / "check.jsonl", "a")

  def record(self, stage: str, **fields) -> dict:
    row = {"stage": stage, "t": round(time.time() - self.start, 2), **fields}
    self.log.write(json.dumps(row) + "\n")
    self.log.flush()
    print(json.dumps(row), flush=True)
    return row

  def note(self, stage: str, what: str, value: str) -> None:
    self.summary.append((stage, what, value))

  def time_left(self) -> float:
    return self.stage_deadline - time.time()


# ---------------------------------------------------------------------------------------------- helpers


def seconds_per_call(fn, *args, reps: int = 5, inner: int = 3) -> float:
  """Median over `reps` of the wall time of `inner` back-to-back calls (dispatched asynchronously, then
  waited for) divided by `inner`, after one call that compiles and warms up."""
  import jax

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / inner)
  return statistics.median(times)


def random_int4(n_in: int, n_out: int, group_size: int, seed: int):
  """A valid INT4 QTensor ("int", with offsets) with random codes, float16 scales and offsets."""
  import jax.numpy as jnp
  import numpy as np

  from qalora_jax.quant import QTensor
  from qalora_jax.quant.qtensor import QMeta

  rng = np.random.default_rng(seed)
  groups = -(-n_in // group_size)
  scale = rng.uniform(0.005, 0.02, size=(groups, n_out))
  arrays = {"codes": jnp.asarray(rng.integers(0, 2 ** 32, size=(n_in // 8, n_out), dtype=np.uint32)),
            "scale": jnp.asarray(scale, jnp.float16),
            "offset": jnp.asarray(-8 * scale + rng.normal(size=scale.shape) * 0.002, jnp.float16)}
  return QTensor(arrays, QMeta("int", (n_in, n_out), 4, group_size, (("symmetric", False),)))


def dequantize64(qt):
  """W~ [in, out] in float64, unpacked with numpy from the words (code i in bits [4 (i % 8), +4) of word i // 8)."""
  import numpy as np

  n_in, n_out = qt.shape
  words = np.asarray(qt["codes"]).astype(np.uint64)
  q = np.stack([(words >> np.uint64(4 * j)) & np.uint64(0xF) for j in range(8)], axis=1).reshape(-1, n_out)
  group = np.arange(n_in) // qt.group_size
  return (np.asarray(qt["scale"], np.float64)[group] * q[:n_in].astype(np.float64)
          + np.asarray(qt["offset"], np.float64)[group])


def relative_error(got, want) -> float:
  import numpy as np

  got = np.asarray(got, np.float64)
  if not np.isfinite(got).all():
    return float("inf")
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def xla_matmul(x, qt, transpose: bool = False):
  """base_matmul's XLA path: W~ dequantized to x's dtype, then a dot accumulated in x's dtype."""
  import jax.numpy as jnp

  w = qt.dequantize(x.dtype)
  return jnp.einsum("...o,io->...i" if transpose else "...i,io->...o", x, w, preferred_element_type=x.dtype)


def short(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}"
  return text if len(text) < 1500 else text[:1500] + " ..."


# ---------------------------------------------------------------------------------------------- stages


def stage_env(c: Check) -> None:
  import jax
  import jax.numpy as jnp

  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "triton", "ml_collections", "gguf"):
    try:
      versions[name] = importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  devices = jax.devices()
  c.record("env", versions=versions, backend=jax.default_backend(), devices=[str(d) for d in devices],
           device_kind=devices[0].device_kind, installed_wheels=c.cache.get("installed", []))
  c.note("env", "device", f"{devices[0].device_kind} ({jax.default_backend()}), jax {versions['jax']}")
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.mem,power.draw,"
                          "temperature.gpu", "--format=csv"], capture_output=True, text=True, timeout=20)
    c.record("env", nvidia_smi=smi.stdout.strip())
  except (OSError, subprocess.TimeoutExpired):
    pass

  n = c.plan.matmul_n
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  a = jax.random.normal(keys[0], (n, n), jnp.bfloat16)
  b = jax.random.normal(keys[1], (n, n), jnp.bfloat16)
  t = seconds_per_call(jax.jit(jnp.matmul), a, b, reps=10)
  c.ceilings["bf16_flops"] = 2 * n ** 3 / t
  c.record("env", ceiling="bf16 matmul", n=n, seconds=t, tflops=c.ceilings["bf16_flops"] / 1e12)
  del a, b
  x = jax.random.normal(keys[0], (c.plan.copy_elements,), jnp.bfloat16)
  t = seconds_per_call(jax.jit(lambda x: x + 1), x, reps=10)
  c.ceilings["copy_bytes_per_s"] = 2 * x.nbytes / t
  c.record("env", ceiling="copy y = x + 1", bytes=2 * x.nbytes, seconds=t, gb_s=c.ceilings["copy_bytes_per_s"] / 1e9)
  datasheet = next((v for k, v in DATASHEET_BF16.items() if k in devices[0].device_kind), None)
  c.ceilings["datasheet_bf16_flops"] = datasheet
  c.note("env", "bf16 matmul", f"{c.ceilings['bf16_flops'] / 1e12:.0f} TFLOP/s (n={n})"
         + (f"; datasheet {datasheet / 1e12:.0f}" if datasheet else ""))
  c.note("env", "copy", f"{c.ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s")


def stage_lowering(c: Check) -> None:
  import jax
  import jax.numpy as jnp

  from qalora_jax.kernels import int4_matmul as pallas_int4
  from qalora_jax.nn.linear import base_matmul

  dry = c.plan.dry
  cases = [((576, 576), 32, False, 1), ((576, 1536), 128, True, 16), (LAYER_8B, 32, False, 1)]
  if dry:
    cases = [((128, 64), 32, False, 1), ((64, 192), 128, True, 16)]
  results = {}
  for backend in ("triton", "default"):
    ok = 0
    for (n_in, n_out), g, transpose, m in cases:
      qt = random_int4(n_in, n_out, g, seed=1)
      x = jnp.ones((m, n_out if transpose else n_in), jnp.bfloat16)
      fn = jax.jit(lambda x, qt, t=transpose, b=backend: pallas_int4.int4_matmul(x, qt, transpose=t, backend=b))
      case = {"shape": [n_in, n_out], "group_size": g, "transpose": transpose, "m": m, "backend": backend}
      start = time.time()
      try:
        if dry:  # lowering only: the CUDA lowering runs on any host, compiling needs the GPU
          fn.trace(x, qt).lower(lowering_platforms=("cuda",))
        else:
          jax.block_until_ready(fn.lower(x, qt).compile()(x, qt))
        ok += 1
        c.record("lowering", **case, ok=True, seconds=time.time() - start)
      except Exception as e:  # noqa: BLE001 - the default backend is expected to refuse this kernel
        c.record("lowering", **case, ok=False, seconds=time.time() - start, error=short(e))
    results[backend] = ok
  c.note("lowering", "compiles (triton / default)", f"{results['triton']}/{len(cases)} / "
         f"{results['default']}/{len(cases)}" + (" (lowered, not compiled: dry run)" if dry else ""))
  qt = random_int4(*((128, 64) if dry else (576, 1536)), 32, seed=2)
  x = jnp.ones((1, qt.shape[0]), jnp.bfloat16)
  traced = jax.jit(base_matmul).trace(x, qt)
  lowered = traced.lower(lowering_platforms=("cuda",)) if dry else traced.lower()
  in_model = "__gpu$xla.gpu.triton" in lowered.as_text()
  c.record("lowering", base_matmul_runs_the_kernel_on_cuda=in_model)
  c.note("lowering", "base_matmul (1 row) on cuda", "the Triton kernel" if in_model else "XLA only")


def stage_correctness(c: Check) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qalora_jax.kernels.int4_matmul import int4_matmul

  rng = np.random.default_rng(0)
  worst, passed, total, skipped = 0.0, 0, 0, 0
  group_for_rows = {1: 32, 5: 64, 37: 128}
  # rows outer (one group size per row count): each weight is unpacked to float64 once
  cases = [(shape, m, transpose, group_for_rows[m], "float32") for m in c.plan.correctness_rows
           for shape in c.plan.correctness_shapes for transpose in (False, True)]
  cases += [(shape, 5, False, 32, "bfloat16") for shape in c.plan.correctness_shapes]
  weights = {}
  for (n_in, n_out), m, transpose, g, dtype in cases:
    if c.time_left() < 3:
      skipped += 1
      continue
    if weights.get("key") != (n_in, n_out, g):  # one weight (and its float64 copy) at a time
      qt = random_int4(n_in, n_out, g, seed=g)
      weights = {"key": (n_in, n_out, g), "qt": qt, "w64": dequantize64(qt)}
    qt, w64 = weights["qt"], weights["w64"]
    x = rng.normal(size=(m, n_out if transpose else n_in))
    xj = jnp.asarray(x, dtype)
    if dtype == "bfloat16":
      x = np.asarray(xj, np.float64)
      w64 = np.asarray(jnp.asarray(w64, jnp.float32).astype(jnp.bfloat16), np.float64)
    want = x @ (w64.T if transpose else w64)
    with jax.default_matmul_precision("highest"):
      got = int4_matmul(xj, qt, transpose=transpose, interpret=c.plan.dry)
      xla = xla_matmul(xj, qt, transpose)
    error, xla_error = relative_error(got, want), relative_error(xla, want)
    target = 1e-5 if dtype == "float32" else 2 ** -8
    total += 1
    passed += error <= target
    worst = max(worst, error) if dtype == "float32" else worst
    c.record("correctness", shape=[n_in, n_out], m=m, transpose=transpose, group_size=g, dtype=dtype,
             rel_error=error, xla_rel_error=xla_error, target=target, ok=error <= target)
  c.note("correctness", "kernel vs float64", f"{passed}/{total} within target; worst float32 "
         f"{worst:.2e} (target 1e-5)" + (f"; {skipped} skipped (time)" if skipped else ""))


def stage_microbench(c: Check) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from qalora_jax.kernels.int4_matmul import choose_blocks, int4_matmul

  copy_bw = c.ceilings.get("copy_bytes_per_s")
  rng = np.random.default_rng(1)
  cases = [(shape, g, m, False) for m in c.plan.micro_rows for shape, g in c.plan.micro_shapes]
  if not c.plan.dry:
    cases += [(LAYER_8B, 32, m, True) for m in (1, 16)]
  copies, skipped = {}, 0  # (in, out, g) -> copies of the weight, kept for every row count
  for (n_in, n_out), g, m, transpose in cases:
    if c.time_left() < 5:
      skipped += 1
      continue
    key = (n_in, n_out, g)
    if key not in copies:
      one = random_int4(n_in, n_out, g, seed=0)
      count = 2 if c.plan.dry else max(2, min(64, math.ceil(4 * L2_BYTES / one.nbytes)))
      copies[key] = [one] + [random_int4(n_in, n_out, g, seed=s) for s in range(1, count)]
    qts = copies[key]
    x = jnp.asarray(rng.normal(size=(m, n_out if transpose else n_in)), jnp.bfloat16)
    width = n_in if transpose else n_out
    row = {"shape": [n_in, n_out], "group_size": g, "m": m, "transpose": transpose, "copies": len(qts),
           "blocks": dataclasses.asdict(choose_blocks(m, qts[0], transpose=transpose))}
    moved = qts[0].nbytes + x.nbytes + m * width * 2
    for name, op in (("kernel", lambda x, qt: int4_matmul(x, qt, transpose=transpose, interpret=c.plan.dry)),
                     ("xla", lambda x, qt: xla_matmul(x, qt, transpose))):
      many = jax.jit(lambda x, qts, op=op: [op(x, qt) for qt in qts])
      try:
        t = seconds_per_call(many, x, qts, reps=5, inner=2) / len(qts)
        row[name] = {"us": t * 1e6, "gb_s": moved / t / 1e9, "tflops": 2 * m * n_in * n_out / t / 1e12}
        if copy_bw:
          row[name]["copy_fraction"] = moved / t / copy_bw
      except Exception as e:  # noqa: BLE001 - one failing case does not stop the others
        row[name] = {"error": short(e)}
    if "us" in row["kernel"] and "us" in row["xla"]:
      row["xla_over_kernel"] = row["xla"]["us"] / row["kernel"]["us"]
    c.record("microbench", **row)
    if m == 1 or (m == c.plan.micro_rows[-1] and not transpose):
      k, xl = row["kernel"], row["xla"]
      if "us" in k and "us" in xl:
        frac = f", {100 * k['copy_fraction']:.0f}% of copy" if "copy_fraction" in k else ""
        c.note("microbench", f"{n_in}x{n_out} g{g} m={m}{' dx' if transpose else ''}",
               f"kernel {k['us']:.1f} us ({k['gb_s']:.0f} GB/s{frac}) vs XLA {xl['us']:.1f} us: "
               f"{row['xla_over_kernel']:.2f}x")
      else:
        c.note("microbench", f"{n_in}x{n_out} g{g} m={m}", f"error: {k.get('error') or xl.get('error')}"[:120])
  if skipped:
    c.note("microbench", "skipped", f"{skipped} cases (time)")


def llama_1b(c: Check):
  """(config, INT4 g32 frozen params) of a 1B-class LLaMA with random weights (LLaMA-3.2-1B's shapes), bf16;
  built once and shared by the train and decode stages."""
  if "llama" in c.cache:
    return c.cache["llama"]
  import jax
  import jax.numpy as jnp

  from qalora_jax import models, quant
  from qalora_jax.models import llama

  if c.plan.dry:
    config = models.Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                           num_kv_heads=2, head_dim=16, max_seq_len=64, tie_embeddings=True, dtype="bfloat16")
  else:
    config = models.Config(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                           num_heads=32, num_kv_heads=8, head_dim=64, max_seq_len=2048, rope_theta=500000.0,
                           tie_embeddings=True, dtype="bfloat16")
  start = time.time()
  params = jax.jit(lambda key: llama.init_params(config, key, dtype=jnp.bfloat16))(jax.random.PRNGKey(0))
  frozen, _ = models.quantize_params(params, quant.get("int", bits=4, group_size=32))
  del params
  jax.block_until_ready(frozen)
  c.record("model", config=dataclasses.asdict(config), params=config.num_params(), seconds=time.time() - start)
  c.cache["llama"] = (config, frozen)
  return config, frozen


def train_flops(config, batch: int, seq: int, rank: int, method: str, group_size: int) -> float:
  """FLOP of one training step with a frozen base (see the module docstring for what is counted)."""
  d, f, L, V = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
  q, kv = config.q_size, config.kv_size
  linears = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
  tokens = batch * seq
  n = L * sum(i * o for i, o in linears) + d * V
  adapter = L * sum(rank * ((-(-i // group_size) if method == "qalora" else i) + o) for i, o in linears)
  attention = L * 6 * batch * seq ** 2 * config.num_heads * config.head_dim
  return 4 * n * tokens + 3 * 2 * adapter * tokens + attention


def stage_train(c: Check) -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from qalora_jax import nn
  from qalora_jax.models import llama
  from qalora_jax.train.step import make_optimizer, make_train_step

  config, frozen = llama_1b(c)
  batch, seq = c.plan.train_batch
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq + 1), 0, config.vocab_size, jnp.int32)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  peak, datasheet = c.ceilings.get("bf16_flops"), c.ceilings.get("datasheet_bf16_flops")
  times = {}
  for method in c.plan.train_methods:
    if c.time_left() < 10:
      c.record("train", method=method, skipped="time")
      continue
    start = time.time()
    adapters = nn.add_adapters(frozen, method, rank=c.plan.rank, alpha=2.0 * c.plan.rank, key=jax.random.PRNGKey(2))
    model = llama.decoder(config, nn.combine(frozen, adapters))
    graphdef, trainable, frozen_state = nnx.split(model, nnx.Param, ...)
    init, step = make_train_step(lambda model, x, y, dropout_rng=None: model.nll(x, y, dropout_rng=dropout_rng),
                                 make_optimizer(2e-4), combine=lambda fr, tr: nnx.merge(graphdef, tr, fr))
    state = init(trainable)
    step = jax.jit(step, donate_argnums=0)
    rng = jax.random.PRNGKey(3)
    state, metrics = step(state, frozen_state, data, rng)  # compiles
    jax.block_until_ready(metrics)
    compile_s = time.time() - start
    steps = []
    for i in range(2 if c.plan.dry else 6):
      t = time.perf_counter()
      state, metrics = step(state, frozen_state, data, rng)
      jax.block_until_ready(metrics)
      steps.append(time.perf_counter() - t)
    t = statistics.median(steps[1:])
    flops = train_flops(config, batch, seq, c.plan.rank, method, 32)
    times[method] = t
    row = {"method": method, "batch": batch, "seq": seq, "step_s": t, "steps_s": steps, "compile_s": compile_s,
           "tokens_per_s": batch * seq / t, "tflop_per_step": flops / 1e12, "tflops": flops / t / 1e12,
           "loss": float(metrics["loss"])}
    if peak:
      row["mfu_measured_peak"] = flops / t / peak
    if datasheet:
      row["mfu_datasheet_peak"] = flops / t / datasheet
    c.record("train", **row)
    mfu = "".join(f", MFU {100 * row[k]:.1f}% of {name}" for k, name in
                  (("mfu_measured_peak", "measured"), ("mfu_datasheet_peak", "datasheet")) if k in row)
    c.note("train", f"{method} step ({batch}x{seq})", f"{1e3 * t:.0f} ms, {row['tflops']:.0f} TFLOP/s{mfu}")
    del state, step
  if len(times) == 2:
    ratio = times["qalora"] / times["lora"]
    c.record("train", qalora_over_lora=ratio)
    c.note("train", "QA-LoRA / LoRA step time", f"{ratio:.3f} (target <= 1.10)")


def stage_decode(c: Check) -> None:
  import jax
  import jax.numpy as jnp

  from qalora_jax import nn
  from qalora_jax.kernels import int4_matmul as pallas_int4
  from qalora_jax.models import generation, llama

  config, frozen = llama_1b(c)
  config = config.replace(eos_ids=())  # never stop early
  params = llama.unstack_blocks(frozen)
  prompt, new = c.plan.decode_tokens
  total = prompt + new
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, prompt), 0, config.vocab_size, jnp.int32)
  mask = jnp.ones((1, prompt), bool)
  kv_bytes = 2 * config.num_layers * total * config.kv_size * jnp.dtype(config.dtype).itemsize
  per_token_bytes = nn.tree_nbytes(params) + kv_bytes
  copy_bw = c.ceilings.get("copy_bytes_per_s")
  kernel_rows = pallas_int4.KERNEL_MAX_ROWS
  results = {}
  try:
    for path in c.plan.decode_paths:
      if c.time_left() < 8:
        c.record("decode", path=path, skipped="time")
        continue
      pallas_int4.KERNEL_MAX_ROWS = kernel_rows if path == "kernel" else 0  # read when tracing; 0: XLA only
      jax.clear_caches()
      args = (config, params, tokens, mask, jax.random.PRNGKey(0), jnp.float32(1.0), jnp.float32(1.0))
      run = lambda: generation.sample(*args, max_new_tokens=new, greedy=True)  # noqa: E731
      start = time.time()
      jax.block_until_ready(run())
      compile_s = time.time() - start
      t = seconds_per_call(run, reps=3, inner=1) / new  # includes one prefill of `prompt` tokens
      results[path] = t
      row = {"path": path, "prompt": prompt, "new_tokens": new, "ms_per_token": 1e3 * t, "tokens_per_s": 1 / t,
             "bytes_per_token": per_token_bytes, "gb_s": per_token_bytes / t / 1e9, "compile_s": compile_s}
      if copy_bw:
        row["copy_fraction"] = per_token_bytes / t / copy_bw
      c.record("decode", **row)
      frac = f", {100 * row['copy_fraction']:.0f}% of copy" if copy_bw else ""
      on_cpu = " (on CPU both paths are XLA's)" if jax.default_backend() == "cpu" else ""
      c.note("decode", f"batch 1, {path}", f"{1e3 * t:.2f} ms/token ({row['gb_s']:.0f} GB/s{frac}){on_cpu}")
  finally:
    pallas_int4.KERNEL_MAX_ROWS = kernel_rows
    jax.clear_caches()
  if len(results) == 2:
    c.record("decode", xla_over_kernel=results["xla"] / results["kernel"])
    c.note("decode", "XLA / kernel time per token", f"{results['xla'] / results['kernel']:.2f}")


STAGES = {"env": stage_env, "lowering": stage_lowering, "correctness": stage_correctness,
          "microbench": stage_microbench, "train": stage_train, "decode": stage_decode}


def print_summary(c: Check) -> str:
  rows = [("stage", "what", "result"), ("---", "---", "---"), *c.summary]
  text = "\n".join(f"| {a} | {b} | {v} |" for a, b, v in rows)
  (c.out / "summary.md").write_text(text + "\n")
  print("\n" + text, flush=True)
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="folder for check.jsonl and summary.md (default: $OUT, "
                      "else runs/gpu-check)")
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, the kernel in interpret mode")
  parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
  parser.add_argument("--budget", type=float, default=None, help="seconds for all stages (default: 370; dry run 120)")
  args = parser.parse_args(argv)
  import os

  out = Path(args.out or os.environ.get("OUT") or "runs/gpu-check")
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    parser.error(f"--stages: {', '.join(unknown)} unknown; choose from {', '.join(STAGES)}")
  installed = install_carried_wheels()
  sys.path.insert(0, str(ROOT))
  if args.dry_run:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  c = Check(Plan.make(args.dry_run), out, args.budget or (120.0 if args.dry_run else 370.0))
  c.cache["installed"] = installed
  c.record("start", argv=sys.argv[1:], dry_run=args.dry_run, stages=stages)
  import jax

  if not args.dry_run and jax.default_backend() not in ("gpu", "cuda"):
    c.record("start", event="error", error=f"no GPU: JAX's backend is {jax.default_backend()!r} "
             f"({jax.devices()}); the full sizes would run for hours here (use --dry-run)")
    c.note("start", "status", f"no GPU (backend {jax.default_backend()})")
    print_summary(c)
    return 1
  for name in stages:
    left = c.deadline - time.time()
    limit = left if args.dry_run else min(STAGE_SECONDS[name], left)
    if limit < 2:
      c.record(name, event="skipped", reason="the check's time budget is spent")
      c.note(name, "status", "skipped (budget)")
      continue
    c.stage_deadline = time.time() + limit
    start = time.time()
    try:
      with time_limit(limit + 15):
        STAGES[name](c)
      c.record(name, event="done", seconds=time.time() - start)
    except Exception as e:  # noqa: BLE001 - a stage's failure is recorded; the next stage runs
      c.record(name, event="error", seconds=time.time() - start, error=short(e),
               traceback=traceback.format_exc()[-3000:])
      c.note(name, "status", f"error: {short(e)[:150]}")
  c.record("end", seconds=time.time() - c.start)
  print_summary(c)
  return 0


if __name__ == "__main__":
  sys.exit(main())
