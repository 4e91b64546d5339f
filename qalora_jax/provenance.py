"""Where a result or a cached file comes from: the code that made it and the content of the files it read.

    code_version()                  # "3f2a9c1d0b7e": this package's version and its source, hashed
    code_version("quant", "models")  # the same over the named parts only (what a cache entry depends on)
    file_sha256(path)               # the content of a file (hashed once per size and modification time)

A result.json records `code_version()`, so that a table can tell runs of different code apart. A cache entry
records the version of the code that produced it (`write_stamp`) and is rebuilt when that code has changed
(`is_current`): its file name keys on what it was computed from (content hashes, options), never on a path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

from qalora_jax import __version__
from qalora_jax.files import write_json

PACKAGE = Path(__file__).resolve().parent


@functools.cache
def code_version(*parts: str) -> str:
  """First 12 hex digits of sha256 over the package version and the source files of `parts` (sub-packages or
  modules of qalora_jax, e.g. "quant", "calibration.py"; the whole package when none is named)."""
  h = hashlib.sha256(__version__.encode())
  roots = [PACKAGE / p for p in parts] if parts else [PACKAGE]
  for root in roots:
    if not root.exists():
      raise ValueError(f"code_version part {root.name!r} is not in the package; allowed: its sub-packages and modules")
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    for f in files:
      h.update(str(f.relative_to(PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
  return h.hexdigest()[:12]


def file_sha256(path: str | Path) -> str:
  """sha256 of a file's content."""
  path = Path(path).resolve()
  stat = path.stat()
  return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def files_sha256(paths, root: str | Path) -> str:
  """sha256 over several files: each one's path relative to `root` and its content hash (order-independent)."""
  h = hashlib.sha256()
  for p in sorted(Path(p) for p in paths):
    h.update(f"{p.relative_to(root)}:{file_sha256(p)}\n".encode())
  return h.hexdigest()


def _stamp(entry: Path) -> Path:
  return entry.with_name(entry.name + ".json")


def write_stamp(entry: str | Path, version: str, **inputs) -> None:
  """Records beside a cache entry (ENTRY.json) the code version that wrote it and what it was made from."""
  write_json(_stamp(Path(entry)), {"code_version": version, "inputs": inputs})


def notice(message: str) -> None:
  """A one-line notice on stderr (stdout stays the commands' output, e.g. JSON lines)."""
  print(message, file=sys.stderr)


def is_current(entry: str | Path, version: str, log=notice) -> bool:
  """Whether the cache entry exists and was made by code of `version`. A stale entry (other code, or no stamp:
  an older layout or an interrupted write) is removed with a one-line notice, so that it is rebuilt."""
  entry = Path(entry)
  if not entry.exists():
    return False
  stamp = _stamp(entry)
  made_by = json.loads(stamp.read_text()).get("code_version") if stamp.exists() else None
  if made_by == version:
    return True
  log(f"cache entry {entry} was made by code version {made_by or 'unknown'}, this code is {version}: rebuilding it")
  entry.unlink()
  stamp.unlink(missing_ok=True)
  return False


code_version()  # hashed at import: the code this process runs, whatever edits land on disk later
