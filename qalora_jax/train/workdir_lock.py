"""One run per workdir: an exclusive lock on WORKDIR/.lock, held while a run uses the workdir.

    with locked(workdir, log):   # raises WorkdirBusy naming the holder (pid, host, start time)
      ...                        # write config.json, metrics.jsonl, checkpoints/, ...

The lock is an `fcntl.flock` on WORKDIR/.lock, which also holds the holder's {"pid", "host", "started"} as
JSON so that a refused run can name it. The kernel drops a flock when its process ends, however it ends
(SIGKILL included), so the lock of a killed run is free at once: the next run takes it over (with a one-line
notice naming the process that left it) and resumes. A run that ends normally removes the file.

Multi-host runs (jax.distributed: every process runs the same command on the same, shared workdir): process 0
alone takes the lock (process 0 writes config.json, metrics.jsonl, the events and result.json; orbax
coordinates the checkpoints), and its outcome is broadcast to the other
processes, so the processes of one run never refuse each other, and all processes of a second run refuse
together before any of them writes.

A filesystem without flock (some network filesystems) cannot keep two runs apart: a one-line warning says so
and the run goes on unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

LOCK_FILE = ".lock"

# how long a refused run waits for the holder's record when the holder has just locked and not yet written it
_RECORD_WAIT_S = 1.0


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


def holder(workdir: str | Path) -> dict | None:
  """The record {"pid", "host", "started"} in the workdir's lock file, or None when there is none (no lock
  file, or one not written yet)."""
  try:
    record = json.loads((Path(workdir) / LOCK_FILE).read_text())
  except (FileNotFoundError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def describe(record: dict | None) -> str:
  """"pid 123 on host h, started 2025-01-31 12:00:00 +0000" (or "an unknown process")."""
  if not record:
    return "an unknown process"
  return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"


def busy_message(workdir: str | Path) -> str:
  """The one-line refusal, naming the holder (waiting briefly for a record not yet written)."""
  deadline = time.monotonic() + _RECORD_WAIT_S
  record = holder(workdir)
  while record is None and time.monotonic() < deadline:
    time.sleep(0.05)
    record = holder(workdir)
  return (f"workdir {workdir} is in use by another run ({describe(record)}); wait for it to finish or use "
          f"another workdir")


def _open_locked(path: Path) -> int | None:
  """A descriptor of `path` holding its exclusive flock, or None when another process holds it."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return None
    except BaseException:
      os.close(fd)
      raise
    # the holder before us may have removed the file between our open and our flock: then we hold a lock on
    # a file no other run can see, and lock the path anew
    try:
      opened, current = os.fstat(fd), os.stat(path)
      if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)


@contextlib.contextmanager
def _flock(workdir: Path, log) -> Iterator[None]:
  """The lock in this process: refuses (WorkdirBusy) while another process holds it, takes over a stale one."""
  path = workdir / LOCK_FILE
  unsupported = None
  try:
    fd = _open_locked(path)
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
      raise
    unsupported = e.strerror
  if unsupported is not None:
    log(f"warning: cannot lock {path} ({unsupported}); a second run on this workdir would not be refused")
    yield
    return
  if fd is None:
    raise WorkdirBusy(busy_message(workdir))
  try:
    left = os.pread(fd, os.fstat(fd).st_size, 0)
    if left.strip():
      try:
        stale = json.loads(left)
      except ValueError:
        stale = None
      log(f"taking over the lock of {workdir} left by a run that ended without releasing it "
          f"({describe(stale if isinstance(stale, dict) else None)})")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    os.fsync(fd)  # visible to a refused run on another host of a network filesystem
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()  # before the lock is dropped: a waiting process then finds the file gone and locks anew
    os.close(fd)


@contextlib.contextmanager
def locked(workdir: str | Path, log=print) -> Iterator[None]:
  """Holds the workdir's lock for the block; raises WorkdirBusy (a one-line message naming the holder: pid,
  host, start time) when another live process holds it. The workdir must exist. See the module docstring for
  multi-host runs."""
  workdir = Path(workdir)
  if jax.process_count() == 1:
    with _flock(workdir, log):
      yield
    return
  from jax.experimental import multihost_utils

  with contextlib.ExitStack() as stack:
    held = 1
    if jax.process_index() == 0:
      try:
        stack.enter_context(_flock(workdir, log))
      except WorkdirBusy:
        held = 0
    held = int(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if not held:
      raise WorkdirBusy(busy_message(workdir))
    yield
