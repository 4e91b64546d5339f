"""The `qalora` command line: help, quantize-report on a toy GGUF and on SmolLM2, errors."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from qalora_jax import cli


def test_help_lists_subcommands():
  out = subprocess.run([sys.executable, "-m", "qalora_jax.cli", "--help"], capture_output=True, text=True)
  assert out.returncode == 0
  for command in ("fetch", "quantize-report"):
    assert command in out.stdout


@pytest.fixture
def toy_gguf(tmp_path):
  """A GGUF with two blocks' linear weights (F32, numpy [out, in] as GGUF stores them)."""
  rng = np.random.default_rng(0)
  path = tmp_path / "toy.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  weights = {}
  for b in range(2):
    for name, (n_in, n_out) in {"attn_q": (64, 64), "ffn_down": (128, 64)}.items():
      w = rng.normal(size=(n_out, n_in)).astype(np.float32)
      writer.add_tensor(f"blk.{b}.{name}.weight", w)
      weights[f"blk.{b}.{name}.weight"] = w.T
  writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # not a linear: ignored
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, weights


def rtn_reference(w, bits, g):
  """Min-max round to nearest with fp16 scale and offset, written independently in numpy."""
  n_in, n_out = w.shape
  wg = w.reshape(n_in // g, g, n_out)
  lo, hi = wg.min(1, keepdims=True), wg.max(1, keepdims=True)
  scale = ((hi - lo) / (2**bits - 1)).astype(np.float16).astype(np.float32)
  offset = lo.astype(np.float16).astype(np.float32)
  q = np.clip(np.round((wg - offset) / scale), 0, 2**bits - 1)
  return (q * scale + offset).reshape(n_in, n_out)


def test_quantize_report_json(toy_gguf, capsys):
  path, weights = toy_gguf
  rc = cli.main(["quantize-report", "--model", str(path), "--quantizer", "int", "nf4", "--bits", "4", "2",
                 "--group-size", "32", "--json"])
  assert rc == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["quantizer"], r["bits"], r["group_size"]) for r in rows] == [("int", 4, 32), ("int", 2, 32),
                                                                          ("nf4", 4, 32)]
  for r in rows:
    assert {"quantizer", "bits", "group_size", "bits_per_weight", "bytes", "weight_rel_error"} <= set(r)
  n = sum(w.size for w in weights.values())
  assert rows[0]["bits_per_weight"] == pytest.approx(5.0)  # 4 + 32 / 32
  assert rows[0]["bytes"] == n * 5 // 8
  assert rows[2]["bits_per_weight"] == pytest.approx(4 + 32 / 32)  # nf4 block 32, float32 absmax
  for row, bits in zip(rows[:2], (4, 2)):
    ref = np.mean([np.sum((w - rtn_reference(w, bits, 32)) ** 2) / np.sum(w**2) for w in weights.values()])
    assert row["weight_rel_error"] == pytest.approx(ref, rel=1e-4)


def test_quantize_report_table(toy_gguf, capsys):
  path, _ = toy_gguf
  assert cli.main(["quantize-report", "--model", str(path), "--bits", "3", "--group-size", "64"]) == 0
  out = capsys.readouterr().out
  assert "4 linear layers" in out and "| int | 3 | 64 |" in out


@pytest.mark.parametrize("argv, message", [
    (["quantize-report", "--quantizer", "bogus"], "unknown quantizer 'bogus'; available:"),
    (["quantize-report", "--bits", "9"], "bits=9 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8"),
    (["fetch", "gpt5"], "unknown asset 'gpt5'; allowed: shakespeare, smollm2-135m"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1


@pytest.mark.real_model
def test_quantize_report_on_smollm2(smollm2_gguf, capsys):
  assert cli.main(["quantize-report", "--model", str(smollm2_gguf), "--bits", "4", "--group-size", "128",
                   "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  # 106,168,320 weights in 210 layers; g128 leaves a 64-wide last group on the 576-wide inputs.
  assert row["bytes"] * 8 / row["bits_per_weight"] == pytest.approx(106_168_320)
  assert 4.25 < row["bits_per_weight"] < 4.3
  assert 0 < row["weight_rel_error"] < 0.02
