"""Sweeps and tables on the tiny config: cells, resume after SIGKILL, failures, shards, tables and plots."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qalora_jax import cli, data
from qalora_jax.eval import tables
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop, sweep, workdir_lock
from test_tensorboard import assert_events_match_metrics

SWEEP = "configs/sweeps/tiny.py"
quiet = lambda message: None  # noqa: E731


def write_sweep(tmp_path, body):
  path = tmp_path / "sweep.py"
  path.write_text(f"def get_sweep(arg=None):\n  return {body}\n")
  return str(path)


def test_cells_expand_the_product_of_each_explicit_cell(tmp_path):
  s = sweep.load(write_sweep(tmp_path, '{"config": "configs/tiny.py", "overrides": {"steps": 3}, '
                                       '"cells": [{"name": "a"}, {"name": "b", "adapter.rank": 2}], '
                                       '"product": {"base.options.bits": [4, 2], "seed": [0, 1]}}'))
  assert [c.name for c in s.cells] == ["a bits=4,seed=0", "a bits=4,seed=1", "a bits=2,seed=0", "a bits=2,seed=1",
                                       "b bits=4,seed=0", "b bits=4,seed=1", "b bits=2,seed=0", "b bits=2,seed=1"]
  cfg = sweep.cell_config(s, s.cells[6])
  assert (cfg.steps, cfg.adapter.rank, cfg.base.options.bits, cfg.seed) == (3, 2, 2, 0)


def test_seeds_cross_every_cell_and_keep_its_name(tmp_path):
  s = sweep.load(write_sweep(tmp_path, '{"config": "configs/tiny.py", "seeds": [0, 1, 2], "cells": ['
                                       '{"name": "base", "steps": 0, "seeds": [0]}, {"name": "a"}, '
                                       '{"name": "b", "adapter.rank": 2}], "product": {"base.options.bits": [4]}}'))
  assert [(c.name, c.dirname, c.seed) for c in s.cells] == [
      ("base bits=4", "base_bits=4_seed=0", 0),
      ("a bits=4", "a_bits=4_seed=0", 0), ("a bits=4", "a_bits=4_seed=1", 1), ("a bits=4", "a_bits=4_seed=2", 2),
      ("b bits=4", "b_bits=4_seed=0", 0), ("b bits=4", "b_bits=4_seed=1", 1), ("b bits=4", "b_bits=4_seed=2", 2)]
  assert [sweep.cell_config(s, c).seed for c in s.cells] == [0, 0, 1, 2, 0, 1, 2]
  assert sweep.cell_config(s, s.cells[5]).adapter.rank == 2


def test_a_seed_decides_data_order_adapter_init_and_dropout(monkeypatch):
  """One seed reproduces a run bit for bit; another changes each of the three (checked one at a time)."""
  cfg = lambda seed: config_lib.load("configs/tiny.py",  # noqa: E731
                                     [f"--config.seed={seed}", "--config.adapter.dropout=0.1"])
  run0, again, run1 = (experiment.build(cfg(s), log=quiet) for s in (0, 0, 1))
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
  differ = lambda x, y: any(not np.array_equal(a, b) for a, b in zip(leaves(x), leaves(y)))  # noqa: E731

  assert not differ(run0.trainable, again.trainable) and differ(run0.trainable, run1.trainable)  # adapter init
  blocks = np.arange(64 * 33).reshape(64, 33)
  rows = lambda seed: data.batch_at(blocks, 4, seed, 3)["inputs"]  # noqa: E731
  assert np.array_equal(rows(0), rows(0)) and not np.array_equal(rows(0), rows(1))  # data order

  state0, _ = loop.train_steps(run0, 2)
  assert not differ(state0.trainable, loop.train_steps(again, 2)[0].trainable)  # bit for bit
  # seed 1's dropout alone: seed 0's model, adapters and batches
  batch_at = data.batch_at
  monkeypatch.setattr(data, "batch_at", lambda b, n, seed, step, mask=None: batch_at(b, n, 0, step, mask))
  dropout_only = dataclasses.replace(run1, frozen=run0.frozen, trainable=run0.trainable, graphdef=run0.graphdef)
  assert differ(state0.trainable, loop.train_steps(dropout_only, 2)[0].trainable)


RESUMABLE = ('{"config": "configs/tiny.py", "overrides": {"steps": 12, "checkpoint_every": 2, "log_every": 1}, '
             '"product": {"base.options.bits": [4, 2]}, '
             '"tables": [{"rows": "name", "value": ["base_ppl", "ppl", "merged_ppl"]}, '
             '{"rows": "method", "columns": "bits", "value": "merged_ppl", "file": "by_bits"}]}')


def test_killed_sweep_resumes_to_the_uninterrupted_table(tmp_path, capsys):
  """Also the training loop's exact resume: the killed cell ends with the uninterrupted cell's adapters, its
  lock (left by the killed process) is taken over, and its TensorBoard events hold what its metrics.jsonl holds."""
  spec = write_sweep(tmp_path, RESUMABLE)
  reference = tmp_path / "reference"
  assert cli.main(["sweep", "--config", spec, "--workdir", str(reference)]) == 0
  assert cli.main(["table", "--workdir", str(reference)]) == 0
  capsys.readouterr()
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "qalora_jax.cli", "sweep", "--config", spec, "--workdir",
                           str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  second = killed / "cells" / "bits=2"
  deadline = time.time() + 240
  while not (second / "checkpoints" / "4").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  time.sleep(random.uniform(0, 0.2))  # a random step of the second cell, after its second checkpoint
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  first = killed / "cells" / "bits=4" / "result.json"
  assert first.exists() and not (second / "result.json").exists()
  assert not (first.parent / workdir_lock.LOCK_FILE).exists() and workdir_lock.holder(second)["pid"] == proc.pid
  mtime = first.stat().st_mtime_ns
  assert cli.main(["sweep", "--config", spec, "--workdir", str(killed)]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out) == {"done": 1, "skipped": 1, "running": 0, "failed": 0}
  assert f"taking over the lock of {second} left by a run that ended without releasing it (pid {proc.pid} " in err
  assert first.stat().st_mtime_ns == mtime  # the finished cell is not re-run
  _, ref_trained, ref_step = experiment.restore(reference / "cells" / "bits=2", log=lambda m: None)
  _, trained, step = experiment.restore(second, log=lambda m: None)
  assert step == ref_step == 12
  for a, b in zip(jax.tree.leaves(ref_trained), jax.tree.leaves(trained)):
    assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= 1e-6
  losses = lambda d: [(m["step"], m["loss"]) for m in map(json.loads, open(d / "metrics.jsonl"))  # noqa: E731
                      if "loss" in m]
  np.testing.assert_allclose(np.array(losses(second)), np.array(losses(reference / "cells" / "bits=2")), rtol=1e-6)
  assert_events_match_metrics(second)
  assert cli.main(["table", "--workdir", str(killed)]) == 0
  assert (killed / "tables.md").read_text() == (reference / "tables.md").read_text()
  assert (killed / "tables" / "by_bits.csv").read_text() == (reference / "tables" / "by_bits.csv").read_text()
  csv = (reference / "tables" / "by_bits.csv").read_text().splitlines()
  assert csv[0] == "method,bits=2,bits=4" and csv[1].startswith("qalora,") and len(csv) == 2
  for png in ("trainable_params.png", "step_time.png", "ppl_vs_bits.png"):
    assert (reference / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  real = sweep.loop.run

  def flaky(cfg, workdir, **kwargs):
    if cfg.adapter.rank == 2:
      raise RuntimeError("out of memory")
    return real(cfg, workdir, **kwargs)

  monkeypatch.setattr(sweep.loop, "run", flaky)
  s = sweep.load(write_sweep(tmp_path, '{"config": "configs/tiny.py", "overrides": {"steps": 2}, '
                                       '"product": {"adapter.rank": [2, 4]}}'))
  outcome = sweep.run(s, tmp_path / "w", progress=False, log=lambda m: None)
  assert outcome == {"done": ["rank=4"], "skipped": [], "running": [], "failed": ["rank=2"]}
  error = json.loads((tmp_path / "w" / "cells" / "rank=2" / "error.json").read_text())
  assert error["error"] == "RuntimeError: out of memory"
  text = tables.write(tmp_path / "w")
  assert "- rank=2: RuntimeError: out of memory" in text and "| rank=4 |" in text


def test_shards_split_the_cells(tmp_path, capsys):
  assert cli.main(["sweep", "--config", SWEEP, "--workdir", str(tmp_path), "--shard", "1/3", "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line[0] for line in lines] == [" ", "*", " ", " "]


@pytest.mark.parametrize("body, message", [
    ('{"config": "configs/tiny.py", "product": {"adapter.rnak": [2, 4]}}',
     r"sweep cell 'rnak=2': unknown config key 'adapter.rnak' \(did you mean 'adapter.rank'\?\)"),
    ('{"config": "configs/tiny.py", "overrides": {"mesh.data": 2}}',
     r"sweep cell 'base': config.mesh.data x config.mesh.fsdp = 2 x 1 = 2 does not match the 1 available device"),
    ('{"config": "configs/tiny.py", "cells": [{"name": "x"}, {"name": "x"}]}', "share the directory 'x'"),
    ('{"config": "configs/tiny.py", "axes": {}}', r"keys \['axes'\] are not supported"),
    ('{"config": "configs/tiny.py", "seeds": [0, 1, 0]}',
     r"seeds=\[0, 1, 0\] is not supported; allowed: a non-empty list of distinct non-negative integers"),
    ('{"config": "configs/tiny.py", "cells": [{"name": "x", "seeds": []}]}', r"cell 'x' seeds=\[\] is not supported"),
    ('{"config": "configs/tiny.py", "seeds": [0, 1], "product": {"seed": [2]}}',
     "'seed' is both an axis or override and given by 'seeds'"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, body, message):
  with pytest.raises(ValueError, match=message):
    sweep.run(sweep.load(write_sweep(tmp_path, body)), tmp_path / "w", log=lambda m: None)
  assert not (tmp_path / "w").exists()


def test_bad_shard_and_table_fields(tmp_path):
  with pytest.raises(ValueError, match=r"--shard '3/3' is not supported; allowed: i/n with 0 <= i < n"):
    sweep.parse_shard("3/3")
  with pytest.raises(ValueError, match="no sweep.json"):
    tables.write(tmp_path)
