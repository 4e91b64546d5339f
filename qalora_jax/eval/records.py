"""A sweep's results as records: `read_sweep` reads the cells, `aggregate` makes one record per cell name.

Every cell with a result.json becomes a record: its name, its flattened config ("adapter.rank", ...), its
metrics ("ppl", "merged_ppl", "tokens_per_s", "free_params", ...; "requantized_ppl.<spec>" for each
re-quantization; "effective_rank.<layer kind>" for each kind of adapted layer) and these derived fields:

    method      lora (float base) | qlora (LoRA on a quantized base) | qalora
    quantizer   base.quantizer;   bits: base.options.bits (4 for nf4/fp4; 32 or 16 for a float base)
    group_size  base.options.group_size (or block_size);   rank: adapter.rank
    step_s      seconds per training step = batch_size x seq_len / tokens_per_s
    effective_rank  the smallest rank the adapted layers can use: min over layer kinds of min(r, L, out),
                L = in for LoRA and ceil(in / group_size) for QA-LoRA, whose A is [L, r] ("-" for results
                written before it was recorded)
    n           the number of seeds behind the record;   code_version, machine: what produced it

Seeds. Records that share a name (the runs of one sweep cell with several seeds, each in its own directory)
are one record: every numeric metric becomes its mean, sample standard deviation (ddof = 1) and n over the
seeds that have it; config fields stay single values, and a field "seed" lists the seeds. Runs sharing a
name must have the same config but for "seed" (else a ValueError names the cell and the differing fields;
a field that only some of them have, added to the config later, is not compared). A single run stays as it
is (n = 1). Tables show an aggregate as "29.503 ± 0.120" (mean ± std, both in the metric's number format),
a value without "±" where all seeds agree, and "(n=2)" after a value whose n differs from the table's usual
n; a note under the table gives that n ("Mean ± sample standard deviation (ddof = 1) over n = 3 seeds ...").
A table in which some value has n > 1 gets, in its CSV, two more columns after each value column C: "C std"
(0 where all seeds agree, empty where n = 1) and "C n" (0 where the value is missing), all plain numbers, so that
`pandas.read_csv(path, na_values="-")` reads every value column as floats. Plots draw error bars (the std)
wherever a plotted value has n > 1.

Effective rank. A table whose cells include runs with an effective rank below the configured rank says so
in a note naming them ("Effective rank below the configured rank: QA-LoRA 4-bit g128 (rank 16, 5 usable)");
"effective_rank" can also be listed as a metric like any other.

Provenance. When the finished cells come from more than one code version (result.json's "code_version";
"unknown" where it has none) or more than one machine (its "machine": CPU model, cores and flags; wall
times and tokens/s are then not comparable), `write` warns, naming each version or machine and its cells,
and adds the warning to tables.md under the tables; the tables are written all the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from qalora_jax.train.config import flat

# fields derived from the config: single values in an aggregated record, like the config's own fields
CONFIG_DERIVED = ("name", "method", "quantizer", "bits", "rank", "group_size")


@dataclasses.dataclass(frozen=True)
class Stat:
  """A metric over n seeds: mean, sample standard deviation (ddof = 1; None when n = 1) and n."""
  mean: float
  std: float | None
  n: int


def machine_text(machine: dict | None) -> str:
  """One line for a result's "machine": 'model, N cores, flag flag' ("unknown" when absent)."""
  if not machine:
    return "unknown"
  flags = " ".join(machine.get("flags") or []) or "no flags"
  return f"{machine.get('model') or '?'}, {machine.get('cores') or '?'} cores, {flags}"


def record(name: str, result: dict) -> dict:
  """One run's flat record: config fields, metrics and the derived fields of the module docstring."""
  cfg = flat(result["config"])
  rec = {f: v for f, v in cfg.items()}
  special = ("config", "requantized_ppl", "effective_rank", "machine")
  rec.update({k: v for k, v in result.items() if k not in special})
  rec.update({f"requantized_ppl.{spec}": v for spec, v in result.get("requantized_ppl", {}).items()})
  ranks = result.get("effective_rank") or {}
  rec.update({f"effective_rank.{kind}": r for kind, r in ranks.items()})
  quantizer = cfg["base.quantizer"]
  if cfg["adapter.method"] == "qalora":
    method = "qalora"
  else:
    method = "lora" if quantizer == "none" else "qlora"
  if quantizer == "none":
    bits = 16 if cfg["model.dtype"] == "bfloat16" else 32
  else:
    bits = cfg.get("base.options.bits", 4)
  tokens_per_step = cfg["data.batch_size"] * cfg["data.seq_len"]
  rec.update(name=name, method=method, quantizer=quantizer, bits=bits, rank=cfg["adapter.rank"],
             group_size=cfg.get("base.options.group_size", cfg.get("base.options.block_size")),
             step_s=tokens_per_step / result["tokens_per_s"] if result.get("tokens_per_s") else None,
             effective_rank=min(ranks.values()) if ranks else None, n=1,
             code_version=result.get("code_version"),
             machine=machine_text(result["machine"]) if result.get("machine") else None)
  return rec


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def stat(values: list) -> Stat | None:
  """Mean, sample standard deviation (ddof = 1) and n of numbers; values all equal keep their value and
  type with std 0; None when there are none."""
  if not values:
    return None
  if len(values) == 1:
    return Stat(values[0], None, 1)
  if len(set(values)) == 1:
    return Stat(values[0], 0.0, len(values))
  a = np.asarray(values, dtype=np.float64)
  return Stat(float(np.mean(a)), float(np.std(a, ddof=1)), len(values))


def aggregate(runs: list[tuple[str, dict]]) -> list[dict]:
  """One record per name from (name, result.json) pairs, in order of first appearance: a name's runs (its
  seeds) must share their config but for "seed"; each numeric metric becomes a Stat over them (see the
  module docstring). A name with one run gives that run's record unchanged."""
  groups: dict[str, list[dict]] = {}
  for name, result in runs:
    groups.setdefault(name, []).append(result)
  return [_aggregate_runs(name, results) for name, results in groups.items()]


def _aggregate_runs(name: str, results: list[dict]) -> dict:
  if len(results) == 1:
    return record(name, results[0])
  configs = [flat(r["config"]) for r in results]
  shared = set.intersection(*(set(c) for c in configs)) - {"seed"}
  differing = [f for f in sorted(shared) if any(c[f] != configs[0][f] for c in configs[1:])]
  if differing:
    detail = "; ".join(f"{f}: {', '.join(dict.fromkeys(json.dumps(c[f]) for c in configs))}" for f in differing)
    raise ValueError(f"cell {name!r}: its runs differ in config fields other than seed ({detail}); "
                     f"give such runs distinct cell names or rerun them")
  recs = [record(name, r) for r in results]
  config_fields = set().union(*(set(c) for c in configs)) | set(CONFIG_DERIVED)
  out = {}
  for field in dict.fromkeys(f for r in recs for f in r):
    values = [r[field] for r in recs if r.get(field) is not None]
    if field in config_fields and field != "seed":
      out[field] = values[0] if values else None
    elif values and all(is_number(v) for v in values):
      out[field] = stat(values)
    elif values and any(v != values[0] for v in values):
      out[field] = " | ".join(dict.fromkeys(str(v) for v in values))
    else:
      out[field] = values[0] if values else None
  out.update(seed=tuple(sorted(r.get("seed") for r in recs)), n=len(recs))
  return out


def read_sweep(workdir: str | Path) -> tuple[list[tuple[str, int | None, dict]], list[tuple[str, str]],
                                              list[dict], list[dict]]:
  """((name, seed, result.json) of finished runs, (label, error) of failed ones, the sweep's tables, its
  plots); the seed is the sweep's (sweep.json's cell "seed": None without a seeds axis)."""
  workdir = Path(workdir)
  if not (workdir / "sweep.json").exists():
    raise ValueError(f"--workdir {workdir}: no sweep.json; not a sweep directory (run `qalora sweep` first)")
  sweep = json.loads((workdir / "sweep.json").read_text())
  finished, failed = [], []
  for cell in sweep["cells"]:
    celldir = workdir / "cells" / cell["dirname"]
    seed = cell.get("seed")
    if (celldir / "result.json").exists():
      finished.append((cell["name"], seed, json.loads((celldir / "result.json").read_text())))
    elif (celldir / "error.json").exists():
      label = cell["name"] if seed is None else f"{cell['name']} seed={seed}"
      failed.append((label, json.loads((celldir / "error.json").read_text())["error"]))
  return finished, failed, sweep.get("tables", []), sweep.get("plots", [])


def _who(runs: list[tuple[str, int | None]]) -> str:
  """'LoRA (seeds 0, 1), QLoRA' from (name, seed) pairs."""
  seeds: dict[str, list] = {}
  for name, seed in runs:
    seeds.setdefault(name, []).extend([] if seed is None else [seed])
  return ", ".join(name if not ss else f"{name} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))})"
                   for name, ss in seeds.items())


def provenance_warnings(finished: list[tuple[str, int | None, dict]]) -> list[str]:
  """One line per way the finished runs are not alike: more than one code version, more than one machine."""
  out = []
  by_version: dict[str, list] = {}
  by_machine: dict[str, list] = {}
  for name, seed, result in finished:
    by_version.setdefault(result.get("code_version") or "unknown", []).append((name, seed))
    by_machine.setdefault(machine_text(result.get("machine")), []).append((name, seed))
  if len(by_version) > 1:
    out.append(f"warning: the results come from {len(by_version)} code versions: "
               + "; ".join(f"{v}: {_who(runs)}" for v, runs in by_version.items()))
  if len(by_machine) > 1:
    out.append(f"warning: the results come from {len(by_machine)} machines (wall times and tokens/s are not "
               f"comparable across them): " + "; ".join(f"{m}: {_who(runs)}" for m, runs in by_machine.items()))
  return out


def mean_of(v: Any) -> Any:
  return v.mean if isinstance(v, Stat) else v


def matches(rec: dict, where: dict) -> bool:
  for field, allowed in (where or {}).items():
    allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
    if rec.get(field) not in allowed:
      return False
  return True


def check_fields(records: list[dict], fields: list[str], what: str) -> None:
  known = set().union(*(r.keys() for r in records)) if records else set()
  for f in fields:
    if records and f not in known:
      raise ValueError(f"{what}={f!r} is not a field of the results; allowed: {', '.join(sorted(known))}")
