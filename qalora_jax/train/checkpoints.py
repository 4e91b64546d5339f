"""Checkpoints with orbax, never of the frozen base.

Training checkpoints (`manager`, `save`, `restore_latest`) hold the trainable leaves, the optimizer state
and the step: what resuming needs. AdamW keeps two moments per trainable value, so they are about 3x the
adapter bytes. The adapter checkpoint (`save_adapters`, `restore_adapters`) written at the end of a run
holds the trained leaves and the step only: about 1x the adapter bytes, what evaluation, merging and export
read.

Orbax writes each step into a temporary directory and renames it when complete, so a killed run leaves
either a whole checkpoint or none. A checkpoint that exists but cannot be read (a corrupted file) is
reported and skipped: `restore_latest` falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qalora_jax.files import atomic_dir, write_json

log = logging.getLogger(__name__)


def manager(directory: str | Path, keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` keeping the newest `keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state) -> None:
  mgr.save(step, args=ocp.args.StandardSave(state), force=True)
  mgr.wait_until_finished()


def restore_latest(mgr: ocp.CheckpointManager, target, report=print):
  """(step, state) of the newest readable checkpoint, or (None, None) when there is none."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      return step, mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: fall back to the previous one
      report(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
             f"falling back to the previous one")
  return None, None


def save_adapters(directory: str | Path, step: int, trainable) -> None:
  """Writes the trained leaves alone (no optimizer state) to `directory`, atomically."""
  with atomic_dir(directory, overwrite=True) as tmp:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp / "tree").absolute(), trainable)
    ckpt.wait_until_finished()
    write_json(tmp / "step.json", {"step": step})


def restore_adapters(directory: str | Path, target, report=print):
  """(step, trained leaves) from an adapter checkpoint, or (None, None) when it is missing or unreadable."""
  directory = Path(directory)
  if not (directory / "step.json").exists():
    return None, None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    step = json.loads((directory / "step.json").read_text())["step"]
    return step, ocp.StandardCheckpointer().restore((directory / "tree").absolute(), abstract)
  except Exception as e:  # noqa: BLE001 - unreadable: the caller falls back to the training checkpoints
    report(f"adapter checkpoint {directory} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
           f"falling back to the training checkpoints")
    return None, None


def disk_bytes(directory: str | Path) -> int:
  """Bytes of all files under `directory`."""
  return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
