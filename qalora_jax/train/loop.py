"""The training loop: a config trained in a workdir, resumable, then evaluated and merged.

    result = run(config, workdir)

The workdir holds config.json (the resolved config), metrics.jsonl and its TensorBoard copy in tensorboard/
(`metrics_log`; unless config.tensorboard is off), checkpoints/ (orbax: trainable leaves + optimizer state +
step) and, at the end, adapters/ (the trained leaves alone) and result.json.
A workdir that already holds a checkpoint of the same config is resumed; batches and dropout keys are pure
functions of (seed, step), so a resumed run computes exactly what an uninterrupted one would.
One run at a time uses a workdir: a second run on it is refused while the first lives (`workdir_lock`; the
lock of a killed run is taken over, so a killed run resumes). A run that fails before its first step (a bad
config, a malformed JSONL line, an unknown held-out play) leaves no workdir behind. In a multi-host run,
process 0 alone writes config.json, metrics.jsonl, the events and result.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import jax
import ml_collections
from tqdm.auto import tqdm

from qalora_jax import hardware, nn, provenance
from qalora_jax.files import write_json
from qalora_jax.train import checkpoints, workdir_lock
from qalora_jax.train import config as config_lib
from qalora_jax.train.experiment import Experiment, build, evaluate_ppl, requantized_ppl, sample, training_data
from qalora_jax.train.metrics_log import TENSORBOARD_DIR, MetricsLog, truncate_metrics
from qalora_jax.train.step import learning_rate_at, learning_rate_schedule


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, overwrite: bool = False, progress: bool = True,
        log=print) -> dict:
  """Trains `cfg` in `workdir` (resuming when it holds a checkpoint) and returns the result dict. Raises
  workdir_lock.WorkdirBusy, before anything in the workdir is written, while another run uses it."""
  workdir = Path(workdir)
  created = not workdir.exists()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with workdir_lock.locked(workdir, log):
      return _run_locked(cfg, workdir, overwrite, progress, log)
  except BaseException:
    if created and jax.process_index() == 0 and not any(workdir.iterdir()):
      workdir.rmdir()  # it failed before writing anything: leave no workdir behind
    raise


def _clear_outputs(workdir: Path) -> None:
  """Removes an earlier run's outputs (--overwrite)."""
  for name in ("checkpoints", "adapters", TENSORBOARD_DIR):
    shutil.rmtree(workdir / name, ignore_errors=True)
  for name in ("metrics.jsonl", "result.json"):
    (workdir / name).unlink(missing_ok=True)


def _run_locked(cfg, workdir: Path, overwrite: bool, progress: bool, log) -> dict:
  """`run` inside the workdir's lock. Nothing is written before the data is ready: a run that fails while it
  loads leaves the workdir as it found it."""
  primary = jax.process_index() == 0  # the process that writes the run's files
  saved = workdir / "config.json"
  if saved.exists() and not overwrite and (diff := config_lib.changed_fields(json.loads(saved.read_text()), cfg)):
    raise ValueError(f"workdir {workdir} holds a run with a different config (differs in: {', '.join(diff)}); "
                     f"use another workdir or --overwrite")
  t_start = time.time()
  exp = build(cfg, log)
  lm = exp.lm
  blocks, mask, held_ids = training_data(cfg, lm)
  if primary:
    if overwrite:
      _clear_outputs(workdir)
    write_json(workdir / "config.json", config_lib.to_json(cfg))
  window = min(512, lm.config.max_seq_len)
  state, frozen, step_fn = exp.on_mesh(donate=True)  # placed before the restore: it restores into these shardings
  exp = dataclasses.replace(exp, frozen=frozen)
  lr = learning_rate_schedule(cfg.optim.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps,
                              schedule=cfg.optim.schedule)

  mgr = checkpoints.manager(workdir / "checkpoints")
  start, restored = checkpoints.restore_latest(mgr, state, report=log)
  metrics_path = workdir / "metrics.jsonl"
  if restored is not None:
    state = restored
    log(f"resuming from step {start}")
    base_ppl = json.loads(metrics_path.read_text().splitlines()[0])["base_ppl"]
    if primary:
      truncate_metrics(metrics_path, start)
  else:
    start = 0
    base_ppl = evaluate_ppl(lm, exp.base_params(), held_ids, window)
    log(f"held-out perplexity of the base: {base_ppl:.3f}")
    if cfg.sample_prompt:
      log(f"sample before training: {cfg.sample_prompt!r} -> {sample(exp, exp.base_params())!r}")
    if primary:
      metrics_path.write_text("")  # a fresh run (lines of an earlier attempt without checkpoints are dropped)

  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  bar = tqdm(total=cfg.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
  t_loop, steps_timed, compile_s = None, 0, 0.0
  if start < cfg.steps:
    t0 = time.time()
    step_fn = step_fn.lower(state, frozen, exp.batch(blocks, mask, start), exp.dropout_key(start)).compile()
    compile_s = time.time() - t0
    hardware.trim_heap()  # the compiler's freed working memory goes back before the steps take theirs
  last_saved = start
  with MetricsLog(workdir, tensorboard=cfg.tensorboard, write=primary) as metrics:
    if restored is None:
      metrics.write({"step": 0, "base_ppl": base_ppl})
    for step in range(start, cfg.steps):
      batch = exp.batch(blocks, mask, step)
      state, m = step_fn(state, frozen, batch, exp.dropout_key(step))
      loss = float(m["loss"])
      if t_loop is None:  # tokens/s counts the steps after the first
        t_loop = time.time()
      else:
        steps_timed += 1
      if not math.isfinite(loss):
        bar.close()
        raise NonFiniteLoss(f"loss is {loss} at step {step + 1}; stopped. The last good checkpoint "
                            f"(step {last_saved}) is kept in {workdir / 'checkpoints'}")
      tok_s = steps_timed * tokens_per_step / (time.time() - t_loop) if steps_timed else 0.0
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
      bar.update(1)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        metrics.write({"step": done, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
                       "learning_rate": learning_rate_at(lr, step)})
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        metrics.write({"step": done, "eval_ppl": evaluate_ppl(lm, exp.params(state.trainable), held_ids, window)})
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        checkpoints.save(mgr, done, state)
        last_saved = done
    bar.close()
    train_s = time.time() - t_loop if t_loop else 0.0
    checkpoints.save_adapters(workdir / "adapters", cfg.steps, state.trainable)

    ppl = evaluate_ppl(lm, exp.params(state.trainable), held_ids, window)
    merged = exp.merged(state.trainable)
    merged_ppl = evaluate_ppl(lm, merged, held_ids, window)
    metrics.write({"step": cfg.steps, "ppl": ppl, "merged_ppl": merged_ppl})
  if cfg.sample_prompt:
    log(f"sample after training (merged): {cfg.sample_prompt!r} -> {sample(exp, merged)!r}")
  requantized = {spec: requantized_ppl(exp, state.trainable, spec, held_ids, window) for spec in cfg.requantize}
  result = {
      "base_ppl": base_ppl, "ppl": ppl, "merged_ppl": merged_ppl,
      "trainable_params": nn.count_params(state.trainable),
      "frozen_bytes": nn.tree_nbytes(frozen), "adapter_bytes": nn.tree_nbytes(state.trainable),
      "adapter_checkpoint_bytes": checkpoints.disk_bytes(workdir / "adapters"),
      "checkpoint_bytes": checkpoints.disk_bytes(workdir / "checkpoints" / str(cfg.steps)),
      "merged_bytes": nn.tree_nbytes(merged),
      "tokens_per_s": steps_timed * tokens_per_step / train_s if steps_timed and train_s else 0.0,
      "compile_s": compile_s, "wall_s": time.time() - t_start, "steps": cfg.steps,
      **nn.adapter_ranks(exp.adapters(state.trainable)),
      "code_version": provenance.code_version(), "machine": hardware.cpu(), "config": config_lib.to_json(cfg),
  }
  if requantized:
    result["requantized_ppl"] = requantized
  if primary:
    write_json(workdir / "result.json", result)
  log(f"held-out perplexity: base {base_ppl:.3f} -> trained {ppl:.3f} -> merged {merged_ppl:.3f}")
  return result


def train_steps(exp: Experiment, steps: int):
  """(state after `steps` plain training steps of the run's config, held-out token ids): the loop's batches
  and keys without its checkpoints, evaluation or logging (for experiments and tests), on the config's mesh."""
  blocks, mask, held = training_data(exp.cfg, exp.lm)
  state, frozen, step_fn = exp.on_mesh(donate=False)
  for step in range(steps):
    state, _ = step_fn(state, frozen, exp.batch(blocks, mask, step), exp.dropout_key(step))
  return state, held
