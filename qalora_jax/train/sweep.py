"""Sweeps: one base config, many cells of overrides, one training workdir per cell.

A sweep file (configs/sweeps/*.py) defines `get_sweep(arg)` returning a dict:

    {
      "config": "configs/qalora.py",               # the base config, "path[:arg]"
      "overrides": {"steps": 60},                  # applied to every cell
      "cells": [                                   # explicit cells (default: one empty cell) ...
          {"name": "QLoRA", "adapter.method": "lora", "base.quantizer": "nf4", "base.options": {...}},
          ...],
      "product": {"base.options.bits": [4, 3, 2]}, # ... each crossed with the product of these axes
      "seeds": [0, 1, 2],                          # ... and run once per seed (default: the config's seed)
      "tables": [...], "plots": [...],             # what `qalora table` draws (see qalora_jax.eval.tables)
    }

Cell keys are dotted config fields (checked against the schema before anything runs) plus an optional
"name", the cell's label in tables, and an optional "seeds" replacing the sweep's for that cell (e.g. [0] for
a row without training, which no seed changes). The runs of one cell with different seeds share its name,
and `qalora table` reports their mean ± standard deviation. Cell i runs in DIR/cells/<name, product values
and seed>/ through
`loop.run`: a cell with a result.json is skipped, one with checkpoints resumes from them, one that another
process is running (its workdir is locked: a repeated shard, a resubmitted job) is skipped as "running" and
left untouched, and one that fails gets an error.json while the sweep goes on. `shard=(i, n)` runs every n-th
cell, starting at i, so that machines or a scheduler's array jobs share a sweep.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
import traceback
from pathlib import Path
from typing import Any

import ml_collections

from qalora_jax.files import write_json
from qalora_jax.train import config as config_lib
from qalora_jax.train import loop
from qalora_jax.train import mesh as mesh_lib
from qalora_jax.train import workdir_lock

SWEEP_KEYS = ("config", "overrides", "cells", "product", "seeds", "tables", "plots")


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str  # label in tables (shared by the seeds of one cell)
  dirname: str  # sub-directory under DIR/cells
  overrides: dict[str, Any]
  seed: int | None = None  # the cell's seed when the sweep has a seeds axis


@dataclasses.dataclass(frozen=True)
class Sweep:
  spec: str
  config: str
  cells: tuple[Cell, ...]
  tables: tuple[dict, ...] = ()
  plots: tuple[dict, ...] = ()
  configs: tuple[ml_collections.ConfigDict, ...] = dataclasses.field(default=(), repr=False, compare=False)

  def to_json(self) -> dict:
    return {"spec": self.spec, "config": self.config, "tables": list(self.tables), "plots": list(self.plots),
            "cells": [dataclasses.asdict(c) for c in self.cells]}


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:120]


def _describe(overrides: dict) -> str:
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())


def load(spec: str) -> Sweep:
  """Reads "configs/sweeps/x.py[:arg]" and expands its cells; every cell's config is built and validated."""
  path = spec.partition(":")[0]
  d = config_lib.call_file(spec, "get_sweep", "sweep")
  unknown = sorted(set(d) - set(SWEEP_KEYS))
  if unknown or "config" not in d:
    raise ValueError(f"sweep {path}: keys {unknown or []} are not supported and 'config' is required; "
                     f"allowed keys: {', '.join(SWEEP_KEYS)}")
  axes = dict(d.get("product", {}))
  for key, values in axes.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise ValueError(f"sweep {path}: product[{key!r}]={values!r} must be a non-empty list")
  sweep_seeds = _seeds(d.get("seeds"), f"sweep {path}: seeds")
  if "seed" in axes or "seed" in d.get("overrides", {}):
    if sweep_seeds != (None,):
      raise ValueError(f"sweep {path}: 'seed' is both an axis or override and given by 'seeds'; allowed: one of them")
  cells, seen = [], {}
  for base in d.get("cells") or [{}]:
    base = dict(base)
    label = base.pop("name", None)
    seeds = _seeds(base.pop("seeds"), f"sweep {path}: cell {label!r} seeds") if "seeds" in base else sweep_seeds
    for combo in itertools.product(*axes.values()):
      point = dict(zip(axes, combo))
      overrides = {**base, **point}
      name = label or _describe(overrides) or "base"
      if label and point:
        name = f"{label} {_describe(point)}"
      for seed in seeds:
        dirname = _slug(name if seed is None else f"{name} seed={seed}")
        if dirname in seen:
          raise ValueError(f"sweep {path}: cells {seen[dirname]!r} and {name!r} share the directory {dirname!r}; "
                           f"give them distinct names")
        seen[dirname] = name
        seeded = {} if seed is None else {"seed": seed}
        cells.append(Cell(name, dirname, {**dict(d.get("overrides", {})), **overrides, **seeded}, seed))
  sweep = Sweep(spec, d["config"], tuple(cells), tuple(d.get("tables", ())), tuple(d.get("plots", ())))
  # every cell's config is built and validated here, once, before anything runs
  return dataclasses.replace(sweep, configs=tuple(cell_config(sweep, cell) for cell in sweep.cells))


def _seeds(values, what: str) -> tuple:
  """A seeds list checked: distinct non-negative integers; (None,) when not given (the config's seed)."""
  if values is None:
    return (None,)
  ok = isinstance(values, (list, tuple)) and values and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
  if not ok or len(set(values)) != len(values):
    raise ValueError(f"{what}={values!r} is not supported; allowed: a non-empty list of distinct non-negative "
                     f"integers, e.g. [0, 1, 2]")
  return tuple(values)


def cell_config(sweep: Sweep, cell: Cell) -> ml_collections.ConfigDict:
  """The cell's config: the base config with the sweep's and the cell's overrides, validated."""
  cfg = config_lib.load(sweep.config)
  try:
    for dotted, value in cell.overrides.items():
      config_lib.override(cfg, dotted, value)
    config_lib.validate(cfg)
  except ValueError as e:
    raise ValueError(f"sweep cell {cell.name!r}: {e}") from None
  return cfg


def parse_shard(text: str) -> tuple[int, int]:
  """"i/n" -> (i, n) with 0 <= i < n."""
  m = re.fullmatch(r"(\d+)/(\d+)", text or "")
  if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
    raise ValueError(f"--shard {text!r} is not supported; allowed: i/n with 0 <= i < n, e.g. 0/4")
  return int(m.group(1)), int(m.group(2))


def run(sweep: Sweep, workdir: str | Path, shard: tuple[int, int] = (0, 1), progress: bool = True,
        log=print) -> dict[str, list[str]]:
  """Runs the sweep's cells of this shard; returns the cell names by outcome: done, skipped (finished before),
  running (by another process, which holds the cell's lock) and failed."""
  workdir = Path(workdir)
  configs = sweep.configs
  for cell, cfg in zip(sweep.cells, configs):  # the devices each cell asks for, before anything runs
    try:
      mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
      mesh_lib.check_batch(cfg.data.batch_size, cfg.optim.accum_steps, mesh)
    except ValueError as e:
      raise ValueError(f"sweep cell {cell.name!r}: {e}") from None
  workdir.mkdir(parents=True, exist_ok=True)
  write_json(workdir / "sweep.json", sweep.to_json())
  outcome = {"done": [], "skipped": [], "running": [], "failed": []}
  mine = [i for i in range(len(sweep.cells)) if i % shard[1] == shard[0]]
  for n, i in enumerate(mine):
    cell, cfg = sweep.cells[i], configs[i]
    celldir = workdir / "cells" / cell.dirname
    if (celldir / "result.json").exists():
      outcome["skipped"].append(cell.name)
      log(f"[{n + 1}/{len(mine)}] {cell.name}: finished before, skipped")
      continue
    log(f"[{n + 1}/{len(mine)}] {cell.name}")
    t0 = time.time()
    try:
      result = loop.run(cfg, celldir, progress=progress, log=log)
    except workdir_lock.WorkdirBusy as e:  # the holder's cell: nothing in it is touched
      outcome["running"].append(cell.name)
      log(f"[{n + 1}/{len(mine)}] {cell.name}: running elsewhere, skipped ({e})")
      continue
    except Exception as e:  # noqa: BLE001 - a failed cell is recorded and the sweep goes on
      celldir.mkdir(parents=True, exist_ok=True)
      write_json(celldir / "error.json", {"cell": cell.name, "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()})
      outcome["failed"].append(cell.name)
      log(f"[{n + 1}/{len(mine)}] {cell.name}: FAILED ({type(e).__name__}: {e}); recorded in "
          f"{celldir / 'error.json'}")
      continue
    (celldir / "error.json").unlink(missing_ok=True)
    outcome["done"].append(cell.name)
    log(f"[{n + 1}/{len(mine)}] {cell.name}: ppl {result['ppl']:.3f}, merged {result['merged_ppl']:.3f} "
        f"({time.time() - t0:.0f} s)")
  return outcome
