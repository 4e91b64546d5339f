"""TensorBoard events beside metrics.jsonl: read back with TensorBoard's own reader, they hold what metrics.jsonl
holds (each tag's (step, value), in float32); config.tensorboard=False writes none. A resumed run's events are
checked in tests/test_sweep.py (the killed sweep)."""

import json
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qalora_jax.train import config as config_lib
from qalora_jax.train import loop, metrics_log

quiet = lambda message: None  # noqa: E731


def scalars_of_metrics(workdir: Path) -> dict[str, list[tuple[int, float]]]:
  """{name: [(step, value), ...]} of every scalar in WORKDIR/metrics.jsonl, in the file's order."""
  out = {}
  for record in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines()):
    for name, value in record.items():
      if name != "step":
        out.setdefault(name, []).append((record["step"], value))
  return out


def scalars_of_events(workdir: Path) -> dict[str, list[tuple[int, float]]]:
  """The same from WORKDIR/tensorboard, read by TensorBoard's EventAccumulator (every event kept)."""
  events = EventAccumulator(str(Path(workdir) / metrics_log.TENSORBOARD_DIR), size_guidance={"scalars": 0})
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_events_match_metrics(workdir: Path) -> None:
  jsonl, events = scalars_of_metrics(workdir), scalars_of_events(workdir)
  assert sorted(events) == sorted(jsonl)
  for tag, points in jsonl.items():
    assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
    np.testing.assert_array_equal(np.float32([v for _, v in events[tag]]), np.float32([v for _, v in points]),
                                  err_msg=tag)


def test_events_match_metrics_jsonl_and_the_switch_turns_them_off(tmp_path):
  cfg = config_lib.load("configs/tiny.py", ["--config.steps=4", "--config.log_every=1", "--config.eval_every=2"])
  result = loop.run(cfg, tmp_path / "on", progress=False, log=quiet)
  assert_events_match_metrics(tmp_path / "on")
  jsonl = scalars_of_metrics(tmp_path / "on")
  assert set(jsonl) == {"base_ppl", "loss", "grad_norm", "tokens_per_s", "learning_rate", "eval_ppl", "ppl",
                        "merged_ppl"}
  assert [s for s, _ in jsonl["loss"]] == [1, 2, 3, 4] and [s for s, _ in jsonl["eval_ppl"]] == [2]
  assert jsonl["learning_rate"] == [(s, 1e-2) for s in (1, 2, 3, 4)]  # each update's (tests/test_train_step.py)
  assert jsonl["base_ppl"] == [(0, result["base_ppl"])]
  assert jsonl["ppl"] == [(4, result["ppl"])] and jsonl["merged_ppl"] == [(4, result["merged_ppl"])]

  cfg.steps, cfg.tensorboard = 0, False  # the base evaluated only
  loop.run(cfg, tmp_path / "off", progress=False, log=quiet)
  assert (tmp_path / "off" / "result.json").exists() and not (tmp_path / "off" / metrics_log.TENSORBOARD_DIR).exists()


def test_event_files_written_directly_read_back_in_tensorboard(tmp_path):
  """train.tensorboard_events: CRC-32C's check value, TensorBoard's own masked CRC on random bytes, and a file of
  scalar events read back by EventAccumulator."""
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

  from qalora_jax.train import tensorboard_events

  assert tensorboard_events.crc32c(b"123456789") == 0xE3069283
  rng = np.random.default_rng(0)
  for n in (0, 1, 7, 100):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tensorboard_events._masked_crc(data) == masked_crc32c(data)
  writer = tensorboard_events.EventWriter(tmp_path / "events")
  writer.add_scalars(3, {"loss": 1.5, "eval/ppl": 40.25})
  writer.add_scalars(300, {"loss": 0.125})
  writer.close()
  events = EventAccumulator(str(tmp_path / "events"), size_guidance={"scalars": 0})
  events.Reload()
  assert sorted(events.Tags()["scalars"]) == ["eval/ppl", "loss"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(3, 1.5), (300, 0.125)]
  assert [(e.step, e.value) for e in events.Scalars("eval/ppl")] == [(3, 40.25)]
