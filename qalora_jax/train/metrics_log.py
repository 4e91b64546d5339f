"""A run's metrics: WORKDIR/metrics.jsonl, one JSON line per record, and its copy as TensorBoard events.

    with MetricsLog(workdir) as metrics:
      metrics.write({"step": 10, "loss": 3.2, "learning_rate": 5e-4})

The records: {"step": 0, "base_ppl"}; {"step", "loss", "grad_norm", "tokens_per_s", "learning_rate"} every
config.log_every steps; {"step", "eval_ppl"} every config.eval_every steps; {"step": steps, "ppl",
"merged_ppl"} at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qalora_jax.files import write_bytes
from qalora_jax.train.tensorboard_events import EventWriter

TENSORBOARD_DIR = "tensorboard"
FINAL_KEYS = ("ppl", "merged_ppl")  # the last line of metrics.jsonl: the trained and the merged model


class MetricsLog:
  """metrics.jsonl, one JSON line per record ({"step": s, name: value, ...}), mirrored as TensorBoard events
  in WORKDIR/tensorboard/ (train.tensorboard_events): each name a scalar tag with the record's step.

  The events are a copy of metrics.jsonl: opening the log removes the events directory and writes the lines
  already in metrics.jsonl anew (a resumed run's lines, truncated to its checkpoint), so the events hold each
  (tag, step) once, as metrics.jsonl does, whatever a killed run had written or left unflushed; the
  replayed events carry the time of the replay. With `tensorboard` off nothing is written there (an events
  directory of an earlier run is left as it is); with `write` off (the other processes of a multi-host run)
  nothing is written at all."""

  def __init__(self, workdir: Path, tensorboard: bool = True, write: bool = True):
    self.path = Path(workdir) / "metrics.jsonl"
    self.file = open(self.path, "a") if write else None
    self.events = None
    if write and tensorboard:
      events_dir = Path(workdir) / TENSORBOARD_DIR
      shutil.rmtree(events_dir, ignore_errors=True)
      self.events = EventWriter(events_dir)
      for line in self.path.read_text().splitlines():
        self._add_events(json.loads(line))

  def _add_events(self, record: dict) -> None:
    self.events.add_scalars(record["step"], {name: value for name, value in record.items() if name != "step"})

  def write(self, record: dict) -> None:
    """Appends `record` (a "step" and scalars) to metrics.jsonl and to the events."""
    if self.file is None:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.events is not None:
      self._add_events(record)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.events is not None:
      self.events.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def truncate_metrics(path: Path, step: int) -> None:
  """Drops metric lines logged after `step` and the final evaluation's line (a resumed run logs them again);
  rewrites atomically."""
  keep = lambda record: record.get("step", 0) <= step and not set(FINAL_KEYS) & record.keys()  # noqa: E731
  lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
  write_bytes(path, "".join(line + "\n" for line in lines).encode())
