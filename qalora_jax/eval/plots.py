"""Plots of a sweep's records (eval/records.py) as PNG files, with error bars (the std over seeds) where n > 1.

A plot is {"file": "x.png", "kind": "line" | "bar", "x": field, "y": metric, "series": field, "where": {...}}
(optional "title", "xlabel", "ylabel", "yscale": "log"),
or, laid out point by point, {"file": ..., "lines": [{"label": ..., "points": [[x, cell name, metric], ...]}]}.
"""

from __future__ import annotations

import io
from pathlib import Path

from qalora_jax.eval.records import Stat, check_fields, matches, mean_of
from qalora_jax.files import write_bytes


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
  ys, err = [mean_of(v) for v in values], _errors(values)
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
      if pts:  # a line whose cells have not finished yet is left out
        _line(ax, [p[0] for p in pts], [p[1] for p in pts], line["label"])
    if ax.has_data():
      ax.legend(fontsize=8)
    ax.set_xticks(sorted({p[0] for line in spec["lines"] for p in line["points"]}))
  else:
    series = spec.get("series")
    check_fields(records, [spec["x"], spec["y"]] + ([series] if series else []), "plot field")
    selected = [r for r in records if matches(r, spec.get("where")) and r.get(spec["x"]) is not None
                and r.get(spec["y"]) is not None]
    if spec.get("kind", "line") == "bar":
      values = [r[spec["y"]] for r in selected]
      err = _errors(values)
      ax.bar([str(mean_of(r[spec["x"]])) for r in selected], [mean_of(v) for v in values], color="#4c72b0",
             **({"yerr": err, "capsize": 3} if err else {}))
      ax.tick_params(axis="x", labelrotation=30)
      for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    else:
      for s in dict.fromkeys(r.get(series) for r in selected) if series else [None]:
        pts = sorted(((mean_of(r[spec["x"]]), r[spec["y"]]) for r in selected if not series or r.get(series) == s),
                     key=lambda p: p[0])
        _line(ax, [p[0] for p in pts], [p[1] for p in pts], str(s) if series else None)
      if series:
        ax.legend(title=series)
      ax.set_xticks(sorted({mean_of(r[spec["x"]]) for r in selected}))
  if ax.has_data():  # (a log scale needs data: a sweep may not have finished any of the plot's cells)
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
