"""Result tables from a sweep's cells, and its plots (eval/plots.py): `qalora table --workdir DIR`.

Records (eval/records.py) are one per cell name: its metrics, config and derived fields, and over seeds
mean ± std and n.

A table is either a pivot,

    {"title": ..., "rows": "method", "columns": "bits", "value": "merged_ppl", "where": {"rank": 16}}

(with no "columns", "value" may list several metrics, one column each; where several records of different
names fall in one pivot cell, it shows the last of them), or an explicit layout, where each
entry names the cell and metric it shows:

    {"title": ..., "columns": ["4", "3"], "layout": [{"row": "QA-LoRA", "cells": {"4": ["QA-LoRA 4", "merged_ppl"]}}]}

or a comparison of pairs of values, each (cell A, metric, cell B, metric), and whether A and B differ by more
than two standard deviations of a single run's difference, 2 s with s = sqrt(s_A^2 + s_B^2) (sample stds over
seeds; 0 for a value of one run, such as a cell without training):

    {"title": ..., "compare": [["QA-LoRA 4-bit", "merged_ppl", "QLoRA", "ppl"], ...]}

Missing values show as "-" (a cell not finished yet, or failed: failures are listed under the tables).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from qalora_jax.eval.plots import default_plots, plot
from qalora_jax.eval.records import (Stat, aggregate, check_fields, is_number, matches, mean_of, provenance_warnings,
                                     read_sweep)
from qalora_jax.files import write_bytes
from qalora_jax.provenance import notice

NUMBER_FORMATS = {"trainable_params": ",.0f", "adapter_bytes": ",.0f", "frozen_bytes": ",.0f",
                  "merged_bytes": ",.0f", "steps": ".0f", "tokens_per_s": ".1f", "step_s": ".2f", "wall_s": ".0f",
                  "compile_s": ".1f", "free_params": ",.0f", "effective_rank": ".0f"}
DEFAULT_METRICS = ("base_ppl", "ppl", "merged_ppl", "trainable_params", "step_s")
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
  note: str = ""


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
  if is_number(v):
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
  if "compare" in spec:
    return _compare(title, spec["compare"], records)
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
  selected = [r for r in records if matches(r, spec.get("where"))]
  row_fields = spec.get("rows", "name")
  row_fields = [row_fields] if isinstance(row_fields, str) else list(row_fields)
  values = spec.get("value", list(DEFAULT_METRICS))
  values = [values] if isinstance(values, str) else list(values)
  column = spec.get("columns")
  check_fields(records, row_fields + ([column] if column else []), "rows/columns")
  check_fields(records, values, "value")
  keys = list(dict.fromkeys(tuple(r.get(f) for f in row_fields) for r in selected))
  if column:
    if len(values) != 1:
      raise ValueError(f"value={values}: a table with columns={column!r} shows one metric")
    col_values = sorted({r.get(column) for r in selected}, key=lambda v: (str(type(v)), mean_of(v)))
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


def _compare(title: str, pairs: list, records: list[dict]) -> Table:
  """A comparison table (see the module docstring): A, B, their values, A - B, 2 s and the verdict."""
  by_name = {r["name"]: r for r in records}
  rows, shown = [], []
  for name_a, metric_a, name_b, metric_b in pairs:
    a, b = _value(metric_a, by_name.get(name_a)), _value(metric_b, by_name.get(name_b))
    row = [f"{name_a} ({metric_a})", f"{name_b} ({metric_b})", a, b]
    if a.value is None or b.value is None:
      rows.append(row + [Value(metric_a, None, 0), Value(metric_a, None, 0), "-"])
      continue
    diff = mean_of(a.value) - mean_of(b.value)
    two_s = 2 * math.hypot(*((v.std or 0.0) if isinstance(v, Stat) else 0.0 for v in (a.value, b.value)))
    n = max(a.n, b.n)
    rows.append(row + [Value(metric_a, diff, n), Value(metric_a, two_s, n), "yes" if abs(diff) > two_s else "no"])
    shown += [by_name[name_a], by_name[name_b]]
  note = ("A - B: the difference of the means; 2 s = 2 sqrt(s_A^2 + s_B^2), s the sample standard deviation "
          "over seeds (0 for a value of one run); beyond 2 std: |A - B| > 2 s.")
  return Table(title, ["A", "B", "A value", "B value", "A - B", "2 s", "beyond 2 std"], rows, shown, note)


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
    eff = mean_of(rec.get("effective_rank"))
    if eff is not None and rec.get("rank") is not None and eff < rec["rank"]:
      low.append(f"{rec['name']} (rank {rec['rank']}, {_fmt('effective_rank', eff)} usable)")
  if low:
    out.append("Effective rank below the configured rank: " + ", ".join(dict.fromkeys(low)) + ".")
  return out + ([table.note] if table.note else [])


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
    return [text.replace(",", "") if is_number(v) else text] + (["", str(c.n)] if spread else [])
  mean = _format_number(c.metric, v.mean).replace(",", "")
  std = "" if v.std is None else _format_number(c.metric, v.std, like=v.mean).replace(",", "")
  return [mean] + ([std, str(v.n)] if spread else [])


def write(workdir: str | Path, tables: list[dict] | None = None, plots: list[dict] | None = None,
          out: str | Path | None = None, log=notice) -> str:
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
