"""Training checkpoints with orbax: trainable leaves, optimizer state and step, never the frozen base.

Orbax writes each step into a temporary directory and renames it when complete, so a killed run leaves
either a whole checkpoint or none. A checkpoint that exists but cannot be read (a corrupted file) is
reported and skipped: `restore_latest` falls back to the previous one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

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
