"""The benchmark commands on the tiny model: they run, and their figures are consistent."""

import json

import pytest

from qalora_jax import bench, cli


def test_bench_train():
  r = bench.bench_train("qalora", batch=2, seq=16, model="tiny", warmup=1, repeats=2)
  assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
  assert r["step_gflop"] > 0 and 0 < r["mfu"] < 1  # XLA counted the step's flops; below the measured peak
  assert r["compile_s"] > 0 and r["peak_rss_mb"] > 100


def test_bench_decode_cli(capsys):
  assert cli.main(["bench", "decode", "--model", "tiny", "--method", "qalora-merged", "--new-tokens", "4",
                   "--repeats", "2"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["tokens_per_s"] > 0 and r["read_gb_s"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 1e9)
  assert cli.main(["bench", "train", "--method", "dora", "--model", "tiny"]) == 2
  assert "--method 'dora' is not supported; allowed: lora, qlora, qalora" in capsys.readouterr().err
