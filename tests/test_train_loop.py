"""The training loop on the tiny config: methods, corrupted checkpoints, non-finite losses, workdir protection,
and the CLI around it. Exact resume after SIGKILL is tested through a killed sweep (tests/test_sweep.py)."""

import json

import jax
import numpy as np
import pytest

from qalora_jax import cli, hardware, provenance, train
from qalora_jax.train import checkpoints, experiment, loop
from qalora_jax.train import config as config_lib

TINY = "configs/tiny.py"
quiet = lambda message: None  # noqa: E731


def tiny(overrides=(), arg="method=qalora"):
  return config_lib.load(f"{TINY}:{arg}", list(overrides))


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_each_method_trains_and_merges(method, tmp_path):
  requantize = ["int:bits=8,group_size=16", "int:bits=2,group_size=16"] if method == "qlora" else []
  overrides = [f"--config.requantize={';'.join(requantize)}"] if requantize else []
  result = loop.run(tiny(overrides, arg=f"method={method}"), tmp_path, progress=False, log=quiet)
  assert {"base_ppl", "ppl", "merged_ppl", "trainable_params", "frozen_bytes", "adapter_bytes", "tokens_per_s",
          "wall_s", "steps", "config"} <= set(result)
  assert result["ppl"] < result["base_ppl"]
  assert result["merged_ppl"] == pytest.approx(result["ppl"], rel=1e-4)
  assert result["code_version"] == provenance.code_version() and result["machine"] == hardware.cpu()
  # r = 4 on every linear of the tiny model (hidden 64, 4 heads + 2 kv heads of 16, mlp 128): QA-LoRA's
  # A has in / 16 rows (4, or 8 for down_proj), so no layer caps the rank; e (L + out - e) per layer, 2 blocks
  assert result["effective_rank"] == {k: 4 for k in ("attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
                                                     "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")}
  rows = {"q": 64, "k": 64, "v": 64, "o": 64, "gate": 64, "up": 64, "down": 128}
  if method == "qalora":
    rows = {k: v // 16 for k, v in rows.items()}
  outs = {"q": 64, "k": 32, "v": 32, "o": 64, "gate": 128, "up": 128, "down": 64}
  assert result["free_params"] == sum(2 * 4 * (rows[k] + outs[k] - 4) for k in rows)
  if method == "qalora":
    assert result["merged_bytes"] == result["frozen_bytes"]  # still the INT4 model
  if requantize:  # the merged float model re-quantized: 8 bits stays close to it, 2 bits moves away
    ppl8, ppl2 = (result["requantized_ppl"][spec] for spec in requantize)
    assert ppl8 == pytest.approx(result["merged_ppl"], rel=2e-3)
    assert abs(ppl2 - result["merged_ppl"]) > 2 * abs(ppl8 - result["merged_ppl"])
  assert json.loads((tmp_path / "result.json").read_text())["steps"] == 12
  # the adapter checkpoint: the trained leaves without optimizer state, the same values as the last checkpoint
  r, trained, step = experiment.restore(tmp_path, log=quiet)
  init, _ = train.make_train_step(r.nll, r.optimizer)
  last, state = checkpoints.restore_latest(checkpoints.manager(tmp_path / "checkpoints"), init(r.trainable))
  assert step == last == 12
  jax.tree.map(np.testing.assert_array_equal, trained, state.trainable)
  assert result["adapter_checkpoint_bytes"] < 1.5 * result["adapter_bytes"] + 20_000
  assert result["checkpoint_bytes"] > 2 * result["adapter_bytes"]  # params + two AdamW moments


def test_corrupted_checkpoint_falls_back_to_the_previous_one(tmp_path):
  loop.run(tiny(), tmp_path, progress=False, log=quiet)  # checkpoints kept: 8 and 12
  for f in (tmp_path / "adapters").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name and f.suffix != ".json":
      f.write_bytes(b"\0" * 7)
  for f in (tmp_path / "checkpoints" / "12").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0" * 7)
  messages = []
  _, _, step = experiment.restore(tmp_path, log=messages.append)
  assert step == 8
  assert any("adapter checkpoint" in m and "unreadable" in m for m in messages)
  assert any("checkpoint at step 12 is unreadable" in m and "falling back" in m for m in messages)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  real = experiment.make_train_step

  def poisoned(*args, **kwargs):
    init, step = real(*args, **kwargs)

    def bad_step(state, frozen, batch, rng):
      state, metrics = step(state, frozen, batch, rng)
      return state, {**metrics, "loss": jax.numpy.where(state.step >= 6, jax.numpy.nan, metrics["loss"])}

    return init, bad_step

  monkeypatch.setattr(experiment, "make_train_step", poisoned)
  with pytest.raises(loop.NonFiniteLoss, match=r"loss is nan at step 6; stopped. The last good checkpoint \(step 4\)"):
    loop.run(tiny(), tmp_path, progress=False, log=quiet)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_workdir_with_another_config_is_refused(tmp_path):
  loop.run(tiny(["--config.steps=1"]), tmp_path, progress=False, log=quiet)
  with pytest.raises(ValueError, match=r"holds a run with a different config \(differs in: adapter.rank\)"):
    loop.run(tiny(["--config.steps=1", "--config.adapter.rank=2"]), tmp_path, progress=False, log=quiet)
  assert (tmp_path / "result.json").exists()  # nothing lost
  result = loop.run(tiny(["--config.steps=1", "--config.adapter.rank=2"]), tmp_path, overwrite=True, progress=False,
                    log=quiet)
  assert result["config"]["adapter"]["rank"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["--config.adapter.rnak=2"], "unknown config key 'adapter.rnak' \\(did you mean 'adapter.rank'\\?\\)"),
    (["--config.steps=many"], "config.steps='many': expected int"),
    (["--config.data.seq_len=1000"], "config.data.seq_len=1000 exceeds the model's context max_seq_len=256"),
    (["--config.adapter.method=dora"], "config.adapter.method='dora' is not supported; allowed: lora, qalora"),
    (["--config.optim.b2=1.0"], r"config.optim.b2=1.0 must be in \[0, 1\)"),
    (["--config.optim.eps=0.0"], "config.optim.eps=0.0 must be positive"),
])
def test_bad_configs(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    loop.run(tiny(overrides), tmp_path, progress=False, log=quiet)


def test_cli_train_eval_merge_export(tmp_path, capsys):
  work = tmp_path / "run"
  assert cli.main(["train", "--config", TINY, "--workdir", str(work), "--config.steps=2"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert cli.main(["eval", "--workdir", str(work)]) == 0
  unmerged = json.loads(capsys.readouterr().out)
  assert cli.main(["eval", "--workdir", str(work), "--merged"]) == 0
  merged = json.loads(capsys.readouterr().out)
  assert unmerged["ppl"] == pytest.approx(result["ppl"], rel=1e-6) and unmerged["step"] == 2
  assert merged["ppl"] == pytest.approx(result["merged_ppl"], rel=1e-6)
  assert cli.main(["merge", "--workdir", str(work), "--out", str(tmp_path / "merged")]) == 0
  assert json.loads(capsys.readouterr().out)["bytes"] == result["frozen_bytes"]
  lora = tmp_path / "lora"
  assert cli.main(["train", "--config", f"{TINY}:method=qlora", "--workdir", str(lora), "--config.steps=1"]) == 0
  capsys.readouterr()
  assert cli.main(["merge", "--workdir", str(lora), "--out", str(tmp_path / "requantized"),
                   "--requantize", "int:bits=3,group_size=32"]) == 0
  requantized = json.loads(capsys.readouterr().out)["bytes"]
  assert cli.main(["merge", "--workdir", str(lora), "--out", str(tmp_path / "float")]) == 0
  assert requantized < json.loads(capsys.readouterr().out)["bytes"]  # INT3 weights instead of float32
  assert cli.main(["export", "--workdir", str(work), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
  capsys.readouterr()
  assert (tmp_path / "peft" / "adapter_config.json").exists()
  assert cli.main(["generate", "--workdir", str(work), "--prompt", "To be", "--max-new-tokens", "4"]) == 0
  assert capsys.readouterr().out.endswith("\n")  # one continuation (the tiny random model writes noise)
  assert cli.main(["eval", "--workdir", str(tmp_path / "nothing")]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_a_run_that_fails_before_its_first_step_leaves_no_workdir(tmp_path):
  """A malformed JSONL line or an unknown held-out play is found before anything is written, so the corrected
  retry in the same workdir is not refused as "a run with a different config"."""
  workdir = tmp_path / "run"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "Say hi.", "output": "Hi."}\nnot json\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
    loop.run(tiny([f"--config.data.jsonl={bad}"]), workdir, progress=False, log=quiet)
  assert not workdir.exists()
  cfg = tiny(["--config.steps=1"])
  cfg.data.heldout = ("romances/the-tempset",)
  with pytest.raises(ValueError, match=r"held-out plays \['romances/the-tempset'\] are not in the corpus"):
    loop.run(cfg, workdir, progress=False, log=quiet)
  assert not workdir.exists()
  assert loop.run(tiny(["--config.steps=1"]), workdir, progress=False, log=quiet)["steps"] == 1


def test_runlocal_shrinks_any_config():
  for method in ("lora", "qlora", "qalora"):
    assert (config_lib.to_json(config_lib.load(f"configs/{method}.py:runlocal"))
            == config_lib.to_json(config_lib.load(f"configs/tiny.py:method={method}")))
  cfg = config_lib.load("configs/quickstart.py:runlocal,steps=3")
  assert (cfg.model.name, cfg.steps, cfg.base.options.group_size, cfg.optim.warmup_steps) == ("tiny", 3, 16, 0)
  assert config_lib.load("configs/quickstart.py").model.name == "smollm2-135m"
