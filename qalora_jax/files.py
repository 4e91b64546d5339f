"""Atomic file and directory writes: write beside the target, then rename into place.

The temporary files and directories Python's tempfile makes are private (0600 / 0700); what replaces the target
gets the mode a plain open() or mkdir() would give it under the process's umask (`umask_mode`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def umask_mode(path: str | Path, directory: bool = False) -> None:
  """Sets `path` to 0o666 (a file) or 0o777 (a directory) less the umask, as open() and mkdir() create them."""
  os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
  """Yields a temporary directory that replaces `target` when the block ends without error; on error the
  temporary directory is removed and `target` is untouched."""
  target = Path(target)
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} exists; choose another output directory or allow overwriting")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
  try:
    umask_mode(tmp, directory=True)
    yield tmp
    if target.exists():
      old = target.with_name(f".{target.name}-old-{os.getpid()}")
      os.rename(target, old)
      os.rename(tmp, target)
      shutil.rmtree(old)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
  """Yields a temporary path beside `target` (same suffix) that replaces `target` when the block ends without
  error; on error the temporary file is removed and `target` is untouched. Creates the directory."""
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=target.suffix)
  os.close(fd)
  try:
    umask_mode(tmp)
    yield Path(tmp)
    os.replace(tmp, target)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | Path, obj: Any) -> None:
  """Writes JSON atomically (see `write_bytes`)."""
  write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_bytes(path: str | Path, data: bytes) -> None:
  """Writes bytes atomically (`atomic_file`)."""
  with atomic_file(path) as tmp:
    tmp.write_bytes(data)
