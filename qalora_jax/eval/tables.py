"""Result tables and plots from a sweep's cells: `qalora table --workdir DIR`.

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

A table is either a pivot,

    {"title": ..., "rows": "method", "columns": "bits", "value": "merged_ppl", "where": {"rank": 16}}

(with no "columns", "value" may list several metrics, one column each; where several records of different
names fall in one pivot cell, it shows the last of them), or an explicit layout, where each
entry names the cell and metric it shows:

    {"title": ..., "columns": ["4", "3"], "layout": [{"row": "QA-LoRA", "cells": {"4": ["QA-LoRA 4", "merged_ppl"]}}]}

A plot is {"file": "x.png", "kind": "line" | "bar", "x": field, "y": metric, "series": field, "where": {...}}
(optional "title", "xlabel", "ylabel", "yscale": "log"),
or, laid out point by point, {"file": ..., "lines": [{"label": ..., "points": [[x, cell name, metric], ...]}]}.
Missing values show as "-" (a cell not finished yet, or failed: failures are listed under the tables).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qalora_jax.files import write_bytes
from qalora_jax.train.config import flat

NUMBER_FORMATS = {"trainable_params": ",.0f", "adapter_bytes": ",.0f", "frozen_bytes": ",.0f",
                  "merged_bytes": ",.0f", "steps": ".0f", "tokens_per_s": ".1f", "step_s": ".2f", "wall_s": ".0f",
                  "compile_s": ".1f", "free_params": ",.0f", "effective_rank": ".0f"}
DEFAULT_METRICS = ("base_ppl", "ppl", "merged_ppl", "trainable_params", "step_s")
# fields derived from the config: single values in an aggregated record, like the config's own fields
CONFIG_DERIVED = ("name", "method", "quantizer", "bits", "rank", "group_size")


@dataclasses.dataclass(frozen=True)
class Stat:
  """A metric over n seeds: mean, sample standard deviation (ddof = 1; None when n = 1) and n."""
  mean: float
  std: float | None
  n: int


@dataclasses.dataclass(frozen=True)
class Value:
  """A table cell showing `metric`: a number, a Stat or None (missing), over n seeds."""
  metric: str
  value: Any
  n: int


@dataclasses.dataclass(frozen=True)
class Table:
  """A built table: a header, rows of labels (str) and Values, and the records whose values it shows."""
  title: str
  header: list[str]
  rows: list[list]
  shown: list[dict]


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


def _number(v: Any) -> bool:
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
    elif values and all(_number(v) for v in values):
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


def load_records(workdir: str | Path) -> tuple[list[dict], list[tuple[str, str]], list[dict], list[dict]]:
  """(records of finished cells, one per name with its seeds aggregated, (label, error) of failed runs, the
  sweep's tables, its plots)."""
  finished, failed, tables, plots = read_sweep(workdir)
  return aggregate([(name, result) for name, _, result in finished]), failed, tables, plots


def _who(runs: list[tuple[str, int | None]]) -> str:
  """'LoRA (seeds 0, 1), QLoRA' from (name, seed) pairs."""
  seeds: dict[str, list] = {}
  for name, seed in runs:
    seeds.setdefault(name, []).append(seed)
  parts = []
  for name, ss in seeds.items():
    ss = [s for s in ss if s is not None]
    parts.append(name if not ss else f"{name} (seed{'s' if len(ss) > 1 else ''} {', '.join(map(str, ss))})")
  return ", ".join(parts)


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


def _mean(v: Any) -> Any:
  return v.mean if isinstance(v, Stat) else v


def _matches(rec: dict, where: dict) -> bool:
  for field, allowed in (where or {}).items():
    allowed = allowed if isinstance(allowed, (list, tuple)) else [allowed]
    if rec.get(field) not in allowed:
      return False
  return True


def _check_fields(records: list[dict], fields: list[str], what: str) -> None:
  known = set().union(*(r.keys() for r in records)) if records else set()
  for f in fields:
    if records and f not in known:
      raise ValueError(f"{what}={f!r} is not a field of the results; allowed: {', '.join(sorted(known))}")


def _format_number(metric: str, v: Any, like: Any = None) -> str:
  """A number in the metric's format (NUMBER_FORMATS, else 3 decimals for floats); `like` picks the format
  by its type instead (a std is printed like its mean)."""
  if isinstance(v, float) and math.isnan(v):
    return "-"
  like = v if like is None else like
  spec = NUMBER_FORMATS.get(metric, ".3f" if isinstance(like, (float, np.floating)) else "d")
  return format(v, spec)


def _fmt(metric: str, v: Any) -> str:
  """A label or a single value as text ("-" when missing)."""
  if isinstance(v, Stat):
    return format_value(Value(metric, v, v.n), v.n)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if _number(v):
    return _format_number(metric, v)
  return str(v)


def format_value(value: Value, usual_n: int) -> str:
  """A table value as text: mean ± std ("29.503 ± 0.120"), the value alone where n = 1 or all seeds agree,
  then " (n=2)" where its n is not the table's usual n; "-" where missing."""
  v = value.value
  if v is None:
    return "-"
  if not isinstance(v, Stat):
    text = _fmt(value.metric, v)
  else:
    text = _format_number(value.metric, v.mean)
    if v.std and text != "-":
      text += f" ± {_format_number(value.metric, v.std, like=v.mean)}"
  return text if value.n == usual_n or text == "-" else f"{text} (n={value.n})"


def _value(metric: str, rec: dict | None) -> Value:
  v = rec.get(metric) if rec else None
  return Value(metric, v, v.n if isinstance(v, Stat) else (rec["n"] if rec else 0))


def build(spec: dict, records: list[dict]) -> Table:
  """The Table of one table spec (pivot or layout; see the module docstring)."""
  title = spec.get("title", "")
  if "layout" in spec:
    columns = [str(c) for c in spec["columns"]]
    by_name = {r["name"]: r for r in records}
    rows, shown = [], []
    for entry in spec["layout"]:
      row = [entry["row"]]
      for col in columns:
        ref = entry["cells"].get(col)
        rec = by_name.get(ref[0]) if ref else None
        row.append(_value(ref[1] if ref else "", rec))
        shown += [rec] if rec else []
      rows.append(row)
    return Table(title, [spec.get("corner", "")] + columns, rows, shown)
  selected = [r for r in records if _matches(r, spec.get("where"))]
  row_fields = spec.get("rows", "name")
  row_fields = [row_fields] if isinstance(row_fields, str) else list(row_fields)
  values = spec.get("value", list(DEFAULT_METRICS))
  values = [values] if isinstance(values, str) else list(values)
  column = spec.get("columns")
  _check_fields(records, row_fields + ([column] if column else []), "rows/columns")
  _check_fields(records, values, "value")
  keys = list(dict.fromkeys(tuple(r.get(f) for f in row_fields) for r in selected))
  if column:
    if len(values) != 1:
      raise ValueError(f"value={values}: a table with columns={column!r} shows one metric")
    col_values = sorted({r.get(column) for r in selected}, key=lambda v: (str(type(v)), _mean(v)))
    header = row_fields + [f"{column}={c}" for c in col_values]
    rows, shown = [], []
    for key in keys:
      row = [_fmt(f, k) for f, k in zip(row_fields, key)]
      for c in col_values:
        hit = [r for r in selected if tuple(r.get(f) for f in row_fields) == key and r.get(column) == c]
        row.append(_value(values[0], hit[-1] if hit else None))
        shown += hit[-1:]
      rows.append(row)
    return Table(title or f"{values[0]} by {', '.join(row_fields)} and {column}", header, rows, shown)
  rows, shown = [], []
  for key in keys:
    rec = [r for r in selected if tuple(r.get(f) for f in row_fields) == key][-1]
    rows.append([_fmt(f, k) for f, k in zip(row_fields, key)] + [_value(v, rec) for v in values])
    shown.append(rec)
  return Table(title or f"{', '.join(values)} by {', '.join(row_fields)}", row_fields + values, rows, shown)


def usual_n(table: Table) -> int:
  """The table's most common n over its present values (the larger one on a tie; 1 when it has none)."""
  counts = collections.Counter(c.n for row in table.rows for c in row if isinstance(c, Value) and c.value is not None)
  return max(counts, key=lambda n: (counts[n], n)) if counts else 1


def notes(table: Table) -> list[str]:
  """The lines under a table: how its values aggregate seeds; runs whose effective rank is below their rank."""
  out = []
  values = [c for row in table.rows for c in row if isinstance(c, Value) and c.value is not None]
  n = usual_n(table)
  if any(v.n > 1 for v in values):
    marked = ", or k where marked (n=k)" if any(v.n != n for v in values) else ""
    out.append(f"Mean ± sample standard deviation (ddof = 1) over n = {n} seed{'s' if n > 1 else ''}{marked}; "
               f"no ± where all seeds agree.")
  low = []
  for rec in table.shown:
    eff = _mean(rec.get("effective_rank"))
    if eff is not None and rec.get("rank") is not None and eff < rec["rank"]:
      low.append(f"{rec['name']} (rank {rec['rank']}, {_fmt('effective_rank', eff)} usable)")
  if low:
    out.append("Effective rank below the configured rank: " + ", ".join(dict.fromkeys(low)) + ".")
  return out


_NUMERIC = re.compile(r"[-+0-9.,e]+( ± [-+0-9.,e]+)?( \(n=\d+\))?|-")


def markdown(table: Table) -> str:
  """The table in Markdown under a "### title" heading, its notes below it."""
  n = usual_n(table)
  rows = [[format_value(c, n) if isinstance(c, Value) else c for c in row] for row in table.rows]
  header = table.header
  numeric = [all(_NUMERIC.fullmatch(row[i]) for row in rows) and i > 0 for i in range(len(header))]
  lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  lines += [line for note in notes(table) for line in ("", note)]
  return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
  """The table as CSV: numbers without thousands separators, "-" where missing; where some value has n > 1,
  each value column C is followed by "C std" and "C n" (see the module docstring)."""
  spread = any(c.n > 1 for row in table.rows for c in row if isinstance(c, Value) and c.value is not None)
  value_cols = [any(isinstance(row[i], Value) for row in table.rows) for i in range(len(table.header))]
  header = []
  for h, is_value in zip(table.header, value_cols):
    header += [h, f"{h} std", f"{h} n"] if spread and is_value else [h]
  rows = []
  for row in table.rows:
    out = []
    for c, is_value in zip(row, value_cols):
      if isinstance(c, Value):
        out += _csv_value(c, spread)
      else:
        out += [c.replace(",", "") if re.fullmatch(r"[-0-9.,]+", c) else c] + (["", "0"] if spread and is_value else [])
    rows.append(out)
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue()


def _csv_value(c: Value, spread: bool) -> list[str]:
  v = c.value
  if v is None:
    return ["-", "", "0"] if spread else ["-"]
  if not isinstance(v, Stat):
    text = _fmt(c.metric, v)
    return [text.replace(",", "") if _number(v) else text] + (["", str(c.n)] if spread else [])
  mean = _format_number(c.metric, v.mean).replace(",", "")
  std = "" if v.std is None else _format_number(c.metric, v.std, like=v.mean).replace(",", "")
  return [mean] + ([std, str(v.n)] if spread else [])


def default_plots(records: list[dict]) -> list[dict]:
  """Perplexity vs bits and vs group size per method (where they vary), parameters and step time per cell."""
  plots = []
  if len({r["bits"] for r in records}) > 1:
    plots.append({"file": "ppl_vs_bits.png", "kind": "line", "x": "bits", "y": "merged_ppl", "series": "method"})
  if len({r["group_size"] for r in records} - {None}) > 1:
    plots.append({"file": "ppl_vs_group_size.png", "kind": "line", "x": "group_size", "y": "merged_ppl",
                  "series": "method"})
  plots.append({"file": "trainable_params.png", "kind": "bar", "x": "name", "y": "trainable_params"})
  plots.append({"file": "step_time.png", "kind": "bar", "x": "name", "y": "step_s"})
  return plots


def _errors(values: list) -> list[float] | None:
  """The std of each value (0 where n = 1) when some value has n > 1, else None (no error bars)."""
  if not any(isinstance(v, Stat) and v.n > 1 for v in values):
    return None
  return [(v.std or 0.0) if isinstance(v, Stat) else 0.0 for v in values]


def _line(ax, xs: list, values: list, label: str | None) -> None:
  """A line through the points, with error bars where a value has n > 1."""
  ys, err = [_mean(v) for v in values], _errors(values)
  if err is None:
    ax.plot(xs, ys, marker="o", label=label)
  else:
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)


def draw(spec: dict, records: list[dict], ax) -> None:
  """Draws one plot spec on a matplotlib Axes (error bars: the std over seeds, where n > 1)."""
  if "lines" in spec:
    by_name = {r["name"]: r for r in records}
    for line in spec["lines"]:
      pts = [(x, by_name[name][metric]) for x, name, metric in line["points"]
             if name in by_name and by_name[name].get(metric) is not None]
      _line(ax, [p[0] for p in pts], [p[1] for p in pts], line["label"])
    ax.legend(fontsize=8)
    ax.set_xticks(sorted({p[0] for line in spec["lines"] for p in line["points"]}))
  else:
    series = spec.get("series")
    _check_fields(records, [spec["x"], spec["y"]] + ([series] if series else []), "plot field")
    selected = [r for r in records if _matches(r, spec.get("where")) and r.get(spec["x"]) is not None
                and r.get(spec["y"]) is not None]
    if spec.get("kind", "line") == "bar":
      values = [r[spec["y"]] for r in selected]
      err = _errors(values)
      ax.bar([str(_mean(r[spec["x"]])) for r in selected], [_mean(v) for v in values], color="#4c72b0",
             **({"yerr": err, "capsize": 3} if err else {}))
      ax.tick_params(axis="x", labelrotation=30)
      for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    else:
      for s in dict.fromkeys(r.get(series) for r in selected) if series else [None]:
        pts = sorted(((_mean(r[spec["x"]]), r[spec["y"]]) for r in selected if not series or r.get(series) == s),
                     key=lambda p: p[0])
        _line(ax, [p[0] for p in pts], [p[1] for p in pts], str(s) if series else None)
      if series:
        ax.legend(title=series)
      ax.set_xticks(sorted({_mean(r[spec["x"]]) for r in selected}))
  ax.set_yscale(spec.get("yscale", "linear"))
  ax.set_xlabel(spec.get("xlabel", spec.get("x", "")))
  ax.set_ylabel(spec.get("ylabel", spec.get("y", "")))
  ax.set_title(spec.get("title", f"{spec.get('y')} vs {spec.get('x')}"))
  ax.grid(alpha=0.3)


def plot(spec: dict, records: list[dict], path: Path) -> None:
  """Draws one plot spec to a PNG (matplotlib, Agg), atomically."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  draw(spec, records, ax)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  write_bytes(path, buf.getvalue())


def _stderr(message: str) -> None:
  print(message, file=sys.stderr)


def write(workdir: str | Path, tables: list[dict] | None = None, plots: list[dict] | None = None,
          out: str | Path | None = None, log=_stderr) -> str:
  """Writes tables.md, tables/<n>.csv and plots/*.png (under `out`, default the workdir); returns the
  Markdown. `tables`/`plots` default to the sweep file's, then to a summary table and the default plots.
  Provenance warnings (code versions, machines) go to `log` and under the tables."""
  finished, failed, sweep_tables, sweep_plots = read_sweep(workdir)
  records = aggregate([(name, result) for name, _, result in finished])
  warnings = provenance_warnings(finished)
  for line in warnings:
    log(line)
  out = Path(out or workdir)
  tables = tables or sweep_tables or [{"rows": "name", "value": list(DEFAULT_METRICS)}]
  plots = plots if plots is not None else (sweep_plots or (default_plots(records) if records else []))
  parts = []
  for i, spec in enumerate(tables):
    table = build(spec, records)
    parts.append(markdown(table))
    name = spec.get("file") or f"table{i + 1}"
    write_bytes(out / "tables" / f"{name}.csv", to_csv(table).encode())
  if failed:
    parts.append("Failed cells:\n\n" + "".join(f"- {name}: {error}\n" for name, error in failed))
  if warnings:
    parts.append("Warnings:\n\n" + "".join(f"- {line.removeprefix('warning: ')}\n" for line in warnings))
  for spec in plots:
    plot(spec, records, out / "plots" / spec["file"])
  text = "\n".join(parts)
  write_bytes(out / "tables.md", text.encode())
  return text
