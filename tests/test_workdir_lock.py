"""One run per workdir, with real processes: while `qalora train` runs in a workdir, a second train on it is
refused with one line naming the holder, and a sweep whose cell it is skips the cell as running elsewhere;
the first run's files stay whole. The takeover of a killed run's lock is tested in tests/test_sweep.py (the
killed sweep)."""

import json
import os
import socket
import subprocess
import sys
import time

from qalora_jax import cli
from qalora_jax.train import sweep, workdir_lock

STEPS = 16
TRAIN = ["--config", "configs/tiny.py", f"--config.steps={STEPS}", f"--config.checkpoint_every={STEPS}",
         "--config.log_every=1", "--config.tensorboard=False"]


def test_a_second_run_on_a_live_runs_workdir_is_refused_and_the_first_finishes_intact(tmp_path, capsys):
  workdir = tmp_path / "sweep" / "cells" / "base"  # also the one cell of the sweep below
  first = subprocess.Popen([sys.executable, "-m", "qalora_jax.cli", "train", *TRAIN, "--workdir", str(workdir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while workdir_lock.holder(workdir) is None and first.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    assert workdir_lock.holder(workdir) == {"pid": first.pid, "host": socket.gethostname(),
                                            "started": workdir_lock.holder(workdir)["started"]}

    assert cli.main(["train", *TRAIN, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"qalora train: error: workdir {workdir} is in use by another run "
                                                   f"(pid {first.pid} on host {socket.gethostname()}, started ")

    spec = tmp_path / "sweep.py"
    spec.write_text('def get_sweep(arg=None):\n  return {"config": "configs/tiny.py", "overrides": '
                    f'{{"steps": {STEPS}, "checkpoint_every": {STEPS}, "log_every": 1, "tensorboard": False}}}}\n')
    messages = []
    outcome = sweep.run(sweep.load(str(spec)), tmp_path / "sweep", progress=False, log=messages.append)
    assert outcome == {"done": [], "skipped": [], "running": ["base"], "failed": []}
    assert (f"base: running elsewhere, skipped (workdir {workdir} is in use by another run "
            f"(pid {first.pid}" in messages[-1])
    assert first.poll() is None, "the first run ended before the second was tried; make it longer"
    _, stderr = first.communicate(timeout=300)
  finally:
    first.kill()
  assert first.returncode == 0, stderr[-4000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # each step once
  assert [r["step"] for r in records if "base_ppl" in r or "ppl" in r] == [0, STEPS]
  assert json.loads((workdir / "result.json").read_text())["steps"] == STEPS
  assert not (workdir / "error.json").exists() and not (workdir / workdir_lock.LOCK_FILE).exists()


def test_a_live_holder_in_this_process_refuses_and_a_released_lock_is_free(tmp_path):
  messages = []
  with workdir_lock.locked(tmp_path, log=messages.append):
    record = workdir_lock.holder(tmp_path)
    assert record["pid"] == os.getpid()
    try:
      with workdir_lock.locked(tmp_path, log=messages.append):
        raise AssertionError("a second lock was granted")
    except workdir_lock.WorkdirBusy as e:
      assert str(e) == (f"workdir {tmp_path} is in use by another run (pid {os.getpid()} on host "
                        f"{socket.gethostname()}, started {record['started']}); wait for it to finish or use "
                        f"another workdir")
  assert workdir_lock.holder(tmp_path) is None and not (tmp_path / workdir_lock.LOCK_FILE).exists()
  with workdir_lock.locked(tmp_path, log=messages.append):
    pass
  assert messages == []  # no stale lock was taken over
