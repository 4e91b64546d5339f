"""Two versions of the code side by side, for the A/B experiments (ab_bench.py, ab_hlo.py, calibration_ab.py).

    with checkout("addac0c") as old:                 # a detached git worktree, removed afterwards
      line = run_json(old, "print(json.dumps(...))", "arg")   # a fresh process importing qalora_jax from `old`
    print_table(rows, out)                           # the result, printed and written atomically
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]

# Imports qalora_jax from the tree in argv[1] (not this checkout's editable install) and shifts argv to the
# program's own arguments.
PRELUDE = """
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
TREE = sys.argv.pop(1)
sys.path.insert(0, TREE)
import qalora_jax
assert qalora_jax.__file__.startswith(TREE), qalora_jax.__file__
"""


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
  """A detached worktree of `rev`, removed when the block ends."""
  with tempfile.TemporaryDirectory(prefix="qalora-ab-") as tmp:
    tree = Path(tmp) / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    try:
      yield tree
    finally:
      subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def run_json(tree: Path, program: str, *args: str, env: dict | None = None) -> dict:
  """The last JSON line `program` prints, run in a fresh process with qalora_jax imported from `tree`."""
  proc = subprocess.run([sys.executable, "-c", PRELUDE + program, str(tree), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})})
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(args)} in {tree} failed:\n{proc.stderr[-2000:]}")
  return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def print_table(rows: list[str], out: str = "") -> None:
  """Prints a Markdown table and, with `out`, writes it there atomically."""
  from qalora_jax.files import write_bytes

  table = "\n".join(rows) + "\n"
  print(table)
  if out:
    write_bytes(Path(out), table.encode())
