"""The README's "Adding a quantizer" example: a quantizer registered from outside the package
(experiments/custom_quantizer/pow2int.py) that `qalora train` fine-tunes with QA-LoRA through config.imports,
and that `qalora eval --merged` finds again from the run's config.json."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import cli, quant

EXAMPLE = "experiments/custom_quantizer"


def test_power_of_two_scales_and_the_bound():
  quant.import_modules([f"{EXAMPLE}/pow2int.py"])
  w = (np.random.default_rng(0).standard_t(5, size=(96, 8)) * 0.05).astype(np.float32)
  quantizer = quant.get("pow2-int", bits=3, group_size=32)
  qt = quantizer.quantize(w)
  assert qt.format == "pow2-int" and qt["exponent"].dtype == jnp.int8 and quant.has_group_offset(qt)
  # 2^e is the smallest power of two whose 7 steps span the group above its stored offset
  span = w.reshape(3, 32, 8).max(axis=1) - np.asarray(qt["offset"], np.float32)
  step = 2.0 ** np.asarray(qt["exponent"], np.float64)
  assert (7 * step >= span).all() and (7 * step / 2 < span).all()
  err = np.abs(np.asarray(qt.dequantize()) - w)
  assert 0 < err.max() and (err <= np.asarray(quantizer.error_bound(w, qt))).all()


def test_qalora_train_and_merged_eval_through_the_cli(tmp_path, capsys):
  work = tmp_path / "run"
  assert cli.main(["train", "--config", f"{EXAMPLE}/config.py:runlocal,steps=3", "--workdir", str(work)]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["merged_ppl"] == pytest.approx(result["ppl"], rel=1e-4)
  assert result["merged_bytes"] == result["frozen_bytes"]  # still pow2-int codes, exponents and offsets
  saved = json.loads((work / "config.json").read_text())
  assert saved["imports"] == [f"{EXAMPLE}/pow2int.py"] and saved["base"]["quantizer"] == "pow2-int"
  assert cli.main(["eval", "--workdir", str(work), "--merged"]) == 0
  assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(result["merged_ppl"], rel=1e-6)
