"""The GPU check (experiments/gpu/check.py) in its dry run: every stage on CPU with tiny shapes and the kernel
in interpret mode, so the script that a GPU machine runs in one call cannot rot between such runs."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "experiments" / "gpu" / "check.py"


def test_dry_run_completes_every_stage(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
  events = {r["stage"]: r["event"] for r in rows if "event" in r}
  assert events == dict.fromkeys(["env", "lowering", "correctness", "microbench", "train", "decode"], "done"), \
      [r for r in rows if r.get("event") == "error"]
  by_stage = lambda stage: [r for r in rows if r["stage"] == stage and "event" not in r]  # noqa: E731

  assert {r["ceiling"] for r in by_stage("env") if "ceiling" in r} == {"bf16 matmul", "copy y = x + 1"}
  lowering = by_stage("lowering")
  assert all(r["ok"] for r in lowering if r.get("backend") == "triton")
  assert any(r.get("base_matmul_runs_the_kernel_on_cuda") for r in lowering)
  correctness = by_stage("correctness")
  assert len(correctness) == 5 and all(r["ok"] for r in correctness)
  assert all(r["rel_error"] < 1e-5 for r in correctness if r["dtype"] == "float32")
  micro = by_stage("microbench")
  assert micro and all(r["kernel"]["us"] > 0 and r["xla"]["us"] > 0 for r in micro)
  train = [r for r in by_stage("train") if "method" in r]
  assert train and all(np.isfinite(r["loss"]) and r["step_s"] > 0 and 0 < r["mfu_measured_peak"] for r in train)
  decode = [r for r in by_stage("decode") if "path" in r]
  assert decode and all(r["ms_per_token"] > 0 and r["bytes_per_token"] > 0 for r in decode)
  summary = (tmp_path / "summary.md").read_text()
  assert summary.startswith("| stage | what | result |") and summary in done.stdout


def _check_module():
  spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_the_float64_reference_unpacks_what_the_quantizer_packs():
  from qalora_jax import quant

  check = _check_module()
  w = np.random.default_rng(0).normal(size=(200, 48)).astype(np.float32)
  qt = quant.get("int", bits=4, group_size=64, scale_dtype="float32").quantize(w)  # 200: a short last group
  np.testing.assert_allclose(check.dequantize64(qt), np.asarray(qt.dequantize(jnp.float32), np.float64),
                             rtol=1e-6, atol=1e-6)
  assert check.dequantize64(check.random_int4(64, 32, 32, seed=0)).shape == (64, 32)


def test_train_flops_count_the_matmuls():
  """One layer, tiny sizes: the count written out by hand."""
  from qalora_jax import models

  check = _check_module()
  config = models.Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                         num_kv_heads=1, head_dim=4, tie_embeddings=True)
  linears = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k, v, o, gate, up, down
  tokens = 3 * 5
  base = 4 * (linears + 8 * 10) * tokens  # forward and dx of the linears and the head
  attention = 6 * 3 * 5 ** 2 * 2 * 4
  lora = 6 * 2 * tokens * (8 + 8 + 8 + 4 + 8 + 4 + 8 + 8 + 8 + 16 + 8 + 16 + 16 + 8)  # rank 2: r (in + out)
  assert check.train_flops(config, 3, 5, 2, "lora", 4) == base + attention + lora
  qalora = 6 * 2 * tokens * (2 + 8 + 2 + 4 + 2 + 4 + 2 + 8 + 2 + 16 + 2 + 16 + 4 + 8)  # in / g = in / 4
  assert check.train_flops(config, 3, 5, 2, "qalora", 4) == base + attention + qalora


def test_the_tuning_dry_run_checks_each_tiling_before_timing_it(tmp_path):
  """experiments/gpu/tune_int4.py on CPU: every trial's output is within bfloat16 rounding of x @ W~ before it
  is timed, each case names its fastest tiling, and the crossover rows compare the chosen blocks with XLA."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, str(CHECK.with_name("tune_int4.py")), "--dry-run", "--out", str(tmp_path)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "tune.jsonl").read_text().splitlines()]
  trials = [r for r in rows if r["what"] == "trial"]
  assert trials and all("error" not in r and r["rel_error"] < 1e-2 and r["kernel"]["us"] > 0 for r in trials)
  assert {r["blocks"]["block_m"] for r in trials} == {1, 16}  # the single-row form and the 16-row dot
  best = {r["case"]: r for r in rows if r["what"] == "best"}
  assert set(best) == {"128x64 g32 m=1", "128x64 g32 m=1 dx"}
  for case, r in best.items():
    assert r["us"] == min(t["kernel"]["us"] for t in trials if t["case"] == case)
  assert any(r["what"] == "crossover" and r["xla_over_kernel"] > 0 for r in rows)
  assert (tmp_path / "summary.md").read_text().startswith("| case | result |")
