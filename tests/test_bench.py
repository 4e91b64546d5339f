"""The benchmark commands on the tiny model: they run, and their figures are consistent."""

import json

import pytest

from qalora_jax import bench, cli


def test_bench_train():
  r = bench.bench_train("qalora", batch=2, seq=16, model="tiny", warmup=1, repeats=2)
  assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
  assert 0 < r["mfu"] < 1  # below the measured matmul peak
  assert r["compile_s"] > 0 and r["peak_rss_mb"] > 100


def test_bench_decode_cli(capsys):
  assert cli.main(["bench", "decode", "--model", "tiny", "--method", "qalora-merged", "--new-tokens", "4",
                   "--repeats", "2"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert r["tokens_per_s"] > 0 and r["read_gb_s"] == pytest.approx(r["bytes_per_token"] * r["tokens_per_s"] / 1e9)
  assert cli.main(["bench", "train", "--method", "dora", "--model", "tiny"]) == 2
  assert "--method 'dora' is not supported; allowed: lora, qlora, qalora" in capsys.readouterr().err


def test_train_flops_match_the_reference_figure():
  # REFERENCE.md section 7: about 556 MFLOP per token for SmolLM2-135M at 128 tokens (forward + input grads)
  config = bench.models.Config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                               num_heads=9, num_kv_heads=3, head_dim=64, max_seq_len=2048)
  assert bench.train_flops_per_token(config, 128) / 1e6 == pytest.approx(556, rel=0.01)


def test_bench_train_takes_the_sweep_axes(capsys):
  assert cli.main(["bench", "train", "--model", "tiny", "--batch", "1", "--seq", "16", "--bits", "3",
                   "--group-size", "16", "--repeats", "1"]) == 0
  r = json.loads(capsys.readouterr().out)
  assert (r["bits"], r["group_size"]) == (3, 16)
  cfg = bench.train_config("qalora", "tiny", 1, 16, "float32", False, bits=2, group_size=64)
  assert dict(cfg.base.options) == {"bits": 2, "group_size": 64}
  assert cli.main(["bench", "train", "--model", "tiny", "--bits", "9"]) == 2
  assert "bits=9 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8" in capsys.readouterr().err
