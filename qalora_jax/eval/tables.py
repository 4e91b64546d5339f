"""Result tables and plots from a sweep's cells: `qalora table --workdir DIR`.

Every cell with a result.json becomes a record: its name, its flattened config ("adapter.rank", ...), its
metrics ("ppl", "merged_ppl", "tokens_per_s", ...; "requantized_ppl.<spec>" for each re-quantization) and
these derived fields:

    method      lora (float base) | qlora (LoRA on a quantized base) | qalora
    quantizer   base.quantizer;   bits: base.options.bits (4 for nf4/fp4; 32 or 16 for a float base)
    group_size  base.options.group_size (or block_size);   rank: adapter.rank
    step_s      seconds per training step = batch_size x seq_len / tokens_per_s

A table is either a pivot,

    {"title": ..., "rows": "method", "columns": "bits", "value": "merged_ppl", "where": {"rank": 16}}

(with no "columns", "value" may list several metrics, one column each), or an explicit layout, where each
entry names the cell and metric it shows:

    {"title": ..., "columns": ["4", "3"], "layout": [{"row": "QA-LoRA", "cells": {"4": ["QA-LoRA 4", "merged_ppl"]}}]}

A plot is {"file": "x.png", "kind": "line" | "bar", "x": field, "y": metric, "series": field, "where": {...}}
(optional "title", "xlabel", "ylabel", "yscale": "log"),
or, laid out point by point, {"file": ..., "lines": [{"label": ..., "points": [[x, cell name, metric], ...]}]}.
Missing values show as "-" (a cell not finished yet, or failed: failures are listed under the tables).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from qalora_jax.files import write_bytes
from qalora_jax.train.config import flat

NUMBER_FORMATS = {"trainable_params": ",.0f", "adapter_bytes": ",.0f", "frozen_bytes": ",.0f",
                  "merged_bytes": ",.0f", "steps": ".0f", "tokens_per_s": ".1f", "step_s": ".2f", "wall_s": ".0f",
                  "compile_s": ".1f"}
DEFAULT_METRICS = ("base_ppl", "ppl", "merged_ppl", "trainable_params", "step_s")


def record(name: str, result: dict) -> dict:
  """One cell's flat record: config fields, metrics and the derived fields of the module docstring."""
  cfg = flat(result["config"])
  rec = {f: v for f, v in cfg.items()}
  rec.update({k: v for k, v in result.items() if k not in ("config", "requantized_ppl")})
  rec.update({f"requantized_ppl.{spec}": v for spec, v in result.get("requantized_ppl", {}).items()})
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
             step_s=tokens_per_step / result["tokens_per_s"] if result.get("tokens_per_s") else None)
  return rec


def load_records(workdir: str | Path) -> tuple[list[dict], list[tuple[str, str]], list[dict], list[dict]]:
  """(records of finished cells, (name, error) of failed ones, the sweep's tables, its plots)."""
  workdir = Path(workdir)
  if not (workdir / "sweep.json").exists():
    raise ValueError(f"--workdir {workdir}: no sweep.json; not a sweep directory (run `qalora sweep` first)")
  sweep = json.loads((workdir / "sweep.json").read_text())
  records, failed = [], []
  for cell in sweep["cells"]:
    celldir = workdir / "cells" / cell["dirname"]
    if (celldir / "result.json").exists():
      records.append(record(cell["name"], json.loads((celldir / "result.json").read_text())))
    elif (celldir / "error.json").exists():
      failed.append((cell["name"], json.loads((celldir / "error.json").read_text())["error"]))
  return records, failed, sweep.get("tables", []), sweep.get("plots", [])


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


def _fmt(metric: str, v: Any) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    spec = NUMBER_FORMATS.get(metric, ".3f" if isinstance(v, float) else "d")
    return format(v, spec)
  return str(v)


def build(spec: dict, records: list[dict]) -> tuple[str, list[str], list[list[str]]]:
  """(title, header, rows of strings) of one table spec."""
  title = spec.get("title", "")
  if "layout" in spec:
    columns = [str(c) for c in spec["columns"]]
    by_name = {r["name"]: r for r in records}
    rows = []
    for entry in spec["layout"]:
      row = [entry["row"]]
      for col in columns:
        ref = entry["cells"].get(col)
        rec = by_name.get(ref[0]) if ref else None
        row.append(_fmt(ref[1], rec.get(ref[1])) if rec else "-")
      rows.append(row)
    return title, [spec.get("corner", "")] + columns, rows
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
    col_values = sorted({r.get(column) for r in selected}, key=lambda v: (str(type(v)), v))
    header = row_fields + [f"{column}={c}" for c in col_values]
    rows = []
    for key in keys:
      row = [_fmt(f, k) for f, k in zip(row_fields, key)]
      for c in col_values:
        hit = [r for r in selected if tuple(r.get(f) for f in row_fields) == key and r.get(column) == c]
        row.append(_fmt(values[0], hit[-1].get(values[0])) if hit else "-")
      rows.append(row)
    return title or f"{values[0]} by {', '.join(row_fields)} and {column}", header, rows
  rows = []
  for key in keys:
    rec = [r for r in selected if tuple(r.get(f) for f in row_fields) == key][-1]
    rows.append([_fmt(f, k) for f, k in zip(row_fields, key)] + [_fmt(v, rec.get(v)) for v in values])
  return title or f"{', '.join(values)} by {', '.join(row_fields)}", row_fields + values, rows


def markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
  numeric = [all(re.fullmatch(r"[-+0-9.,e]+|-", row[i]) for row in rows) and i > 0 for i in range(len(header))]
  lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([[c.replace(",", "") if re.fullmatch(r"[-0-9.,]+", c) else c for c in row] for row in rows])
  return buf.getvalue()


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


def plot(spec: dict, records: list[dict], path: Path) -> None:
  """Draws one plot spec to a PNG (matplotlib, Agg), atomically."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  if "lines" in spec:
    by_name = {r["name"]: r for r in records}
    for line in spec["lines"]:
      pts = [(x, by_name[name][metric]) for x, name, metric in line["points"]
             if name in by_name and by_name[name].get(metric) is not None]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=line["label"])
    ax.legend(fontsize=8)
    ax.set_xticks(sorted({p[0] for line in spec["lines"] for p in line["points"]}))
  else:
    series = spec.get("series")
    _check_fields(records, [spec["x"], spec["y"]] + ([series] if series else []), "plot field")
    selected = [r for r in records if _matches(r, spec.get("where")) and r.get(spec["x"]) is not None
                and r.get(spec["y"]) is not None]
    if spec.get("kind", "line") == "bar":
      ax.bar([str(r[spec["x"]]) for r in selected], [r[spec["y"]] for r in selected], color="#4c72b0")
      ax.tick_params(axis="x", labelrotation=30)
      for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    else:
      for s in dict.fromkeys(r.get(series) for r in selected) if series else [None]:
        pts = sorted((r[spec["x"]], r[spec["y"]]) for r in selected if not series or r.get(series) == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(s) if series else None)
      if series:
        ax.legend(title=series)
      ax.set_xticks(sorted({r[spec["x"]] for r in selected}))
  ax.set_yscale(spec.get("yscale", "linear"))
  ax.set_xlabel(spec.get("xlabel", spec.get("x", "")))
  ax.set_ylabel(spec.get("ylabel", spec.get("y", "")))
  ax.set_title(spec.get("title", f"{spec.get('y')} vs {spec.get('x')}"))
  ax.grid(alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  write_bytes(path, buf.getvalue())


def write(workdir: str | Path, tables: list[dict] | None = None, plots: list[dict] | None = None,
          out: str | Path | None = None) -> str:
  """Writes tables.md, tables/<n>.csv and plots/*.png (under `out`, default the workdir); returns the
  Markdown. `tables`/`plots` default to the sweep file's, then to a summary table and the default plots."""
  records, failed, sweep_tables, sweep_plots = load_records(workdir)
  out = Path(out or workdir)
  tables = tables or sweep_tables or [{"rows": "name", "value": list(DEFAULT_METRICS)}]
  plots = plots if plots is not None else (sweep_plots or (default_plots(records) if records else []))
  parts = []
  for i, spec in enumerate(tables):
    title, header, rows = build(spec, records)
    parts.append(markdown(title, header, rows))
    name = spec.get("file") or f"table{i + 1}"
    write_bytes(out / "tables" / f"{name}.csv", to_csv(header, rows).encode())
  if failed:
    parts.append("Failed cells:\n\n" + "".join(f"- {name}: {error}\n" for name, error in failed))
  for spec in plots:
    plot(spec, records, out / "plots" / spec["file"])
  text = "\n".join(parts)
  write_bytes(out / "tables.md", text.encode())
  return text
