"""Calibrated (GPTQ) bases in training runs: calibration, the base cache, evaluation-only runs, bad
re-quantization settings (re-quantized results: tests/test_train_loop.py)."""

import json

import jax
import numpy as np
import pytest

from qalora_jax import models, provenance, quant
from qalora_jax.train import config as config_lib
from qalora_jax.train import bases, loop

quiet = lambda message: None  # noqa: E731


def tiny(arg, overrides=()):
  return config_lib.load(f"configs/tiny.py:{arg}", list(overrides))


GPTQ = ["--config.base.quantizer=gptq", "--config.base.calibration=8", "--config.base.calibration_len=32"]


def test_gptq_base_is_calibrated_once_and_cached(tmp_path, monkeypatch):
  cfg = tiny("method=qalora", GPTQ)
  monkeypatch.setattr(bases, "bases_dir", lambda: tmp_path / "bases")
  lm, fresh, summary = bases.load_base(cfg, log=quiet)
  assert "calibration tokens" in summary and len(list((tmp_path / "bases").glob("*.safetensors"))) == 1
  _, cached, summary = bases.load_base(cfg, log=quiet)
  assert "from the cache" in summary
  assert jax.tree.structure(cached) == jax.tree.structure(fresh)
  jax.tree.map(np.testing.assert_array_equal, cached, fresh)
  # calibrated: not the same grid as GPTQ without data (H = I), which is round-to-nearest
  rtn, _ = models.quantize_params(lm.params, quant.get("gptq", bits=4, group_size=16))
  kernel = lambda p: np.asarray(p["blocks"]["mlp"]["down_proj"]["kernel"].dequantize())  # noqa: E731
  assert np.abs(kernel(fresh) - kernel(rtn)).max() > 0


def test_zero_steps_evaluates_the_base(tmp_path):
  result = loop.run(tiny("method=qalora", ["--config.steps=0"]), tmp_path, progress=False, log=quiet)
  assert result["ppl"] == pytest.approx(result["base_ppl"], rel=1e-6)
  assert result["merged_ppl"] == pytest.approx(result["base_ppl"], rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["--config.requantize=int:bits=4,group_size=16"], "only a LoRA run has a float merged model"),
])
def test_bad_requantize(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny("method=qalora", overrides)


def test_stale_base_is_rebuilt_with_a_notice(tmp_path, monkeypatch):
  """An entry made by other code (its stamp names another code version) is rebuilt, not reused; one that
  differs only in the run's seed is shared (the base is calibrated with base.calibration_seed)."""
  monkeypatch.setattr(bases, "bases_dir", lambda: tmp_path / "bases")
  cfg = tiny("method=qalora", GPTQ)
  _, fresh, _ = bases.load_base(cfg, log=quiet)
  [entry] = (tmp_path / "bases").glob("*.safetensors")
  stamp = entry.with_name(entry.name + ".json")
  assert json.loads(stamp.read_text())["code_version"] == provenance.code_version(*bases.BASE_CODE)

  stamp.write_text(json.dumps({"code_version": "0123456789ab"}))
  notices = []
  _, rebuilt, summary = bases.load_base(cfg, log=notices.append)
  assert "calibration tokens" in summary
  assert len(notices) == 1 and "0123456789ab" in notices[0] and "rebuilding" in notices[0]
  assert json.loads(stamp.read_text())["code_version"] == provenance.code_version(*bases.BASE_CODE)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, fresh)

  cfg.base.calibration_seed = 1  # other segments: another entry
  bases.load_base(cfg, log=quiet)
  assert len(list((tmp_path / "bases").glob("*.safetensors"))) == 2
