"""`qalora table` over seeds, on hand-made sweep directories (no training): mean ± std (ddof = 1) and n per
value in Markdown, CSV and plots; the effective rank; warnings on mixed code versions and machines."""

import csv
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from qalora_jax.eval import plots as plots_lib
from qalora_jax.eval import records as records_lib
from qalora_jax.eval import tables

MACHINE = {"model": "Test CPU", "cores": 2, "flags": ["avx2"]}
PPL = {"QA-LoRA 4-bit": [29.41, 29.50, 29.65], "QA-LoRA 2-bit": [64.2, 66.0, 65.1], "LoRA": [26.2, 26.3, 26.1]}
TOKENS_PER_S = {"QA-LoRA 4-bit": [50.0, 52.0, 55.0], "QA-LoRA 2-bit": [49.0, 51.0, 50.0], "LoRA": [40.0, 41.0, 39.0]}


def result(name, seed, merged_ppl, tokens_per_s, bits=4, new=True, **extra):
  """A result.json as the training loop writes it (`new`: with the fields added for seed sweeps)."""
  lora = name.startswith("LoRA") or name == "float base"
  cfg = {"adapter": {"method": "lora" if lora else "qalora", "rank": 16},
         "base": {"quantizer": "none" if lora else "int", "options": {} if lora else {"bits": bits, "group_size": 32}},
         "data": {"batch_size": 4, "seq_len": 128}, "model": {"dtype": "float32"}, "seed": seed, "steps": 50}
  out = {"config": cfg, "base_ppl": 35.767, "ppl": merged_ppl, "merged_ppl": merged_ppl,
         "tokens_per_s": tokens_per_s, "trainable_params": 4884480 if lora else 2563200, "steps": 50}
  if new:
    out.update(code_version="aaaaaaaaaaaa", machine=MACHINE, free_params=1000,
               effective_rank={"attn/q_proj": 16, "mlp/down_proj": 16})
  return {**out, **extra}


def write_sweep(workdir, runs, tables_spec=(), plots=()):
  """runs: (name, seed or None, result.json or "error") in sweep order."""
  cells = []
  for name, seed, res in runs:
    dirname = name.replace(" ", "_") + ("" if seed is None else f"_seed={seed}")
    cells.append({"name": name, "dirname": dirname, "overrides": {}, "seed": seed})
    celldir = workdir / "cells" / dirname
    celldir.mkdir(parents=True)
    if res == "error":
      (celldir / "error.json").write_text(json.dumps({"error": "RuntimeError: out of memory"}))
    else:
      (celldir / "result.json").write_text(json.dumps(res))
  (workdir / "sweep.json").write_text(json.dumps({"spec": "x", "config": "y", "cells": cells,
                                                  "tables": list(tables_spec), "plots": list(plots)}))
  return workdir


def load_records(workdir):
  """(records, one per name with its seeds aggregated, failed runs, tables, plots), as `qalora table` reads them."""
  finished, failed, tables_spec, plots = records_lib.read_sweep(workdir)
  return records_lib.aggregate([(name, res) for name, _, res in finished]), failed, tables_spec, plots


def seeded_runs(names=tuple(PPL)):
  runs = [("float base", None, result("float base", 0, 35.767, 0.0))]
  for name in names:
    for seed in range(3):
      runs.append((name, seed, result(name, seed, PPL[name][seed], TOKENS_PER_S[name][seed],
                                      bits=2 if "2-bit" in name else 4)))
  return runs


TABLES = [{"title": "merged", "rows": "name", "value": ["base_ppl", "merged_ppl", "trainable_params", "step_s"],
           "file": "by_name"},
          {"title": "by bits", "rows": "method", "columns": "bits", "value": "merged_ppl", "file": "by_bits"},
          {"title": "layout", "file": "layout", "corner": "method", "columns": ["4-bit", "2-bit"],
           "layout": [{"row": "QA-LoRA", "cells": {"4-bit": ["QA-LoRA 4-bit", "merged_ppl"],
                                                   "2-bit": ["QA-LoRA 2-bit", "merged_ppl"]}}]}]


def test_seeds_aggregate_to_numpy_mean_std_and_n(tmp_path):
  records, failed, _, _ = load_records(write_sweep(tmp_path, seeded_runs()))
  assert failed == [] and [r["name"] for r in records] == ["float base", *PPL]
  by_name = {r["name"]: r for r in records}
  for name, ppl in PPL.items():
    rec = by_name[name]
    assert rec["n"] == 3 and rec["seed"] == (0, 1, 2)
    assert rec["merged_ppl"] == records_lib.Stat(pytest.approx(np.mean(ppl)), pytest.approx(np.std(ppl, ddof=1)), 3)
    step_s = [4 * 128 / t for t in TOKENS_PER_S[name]]  # per seed, then aggregated
    assert rec["step_s"].mean == pytest.approx(np.mean(step_s))
    assert rec["step_s"].std == pytest.approx(np.std(step_s, ddof=1))
    # equal in every seed: the value itself, std 0; config fields stay single values
    assert rec["base_ppl"] == records_lib.Stat(35.767, 0.0, 3) and rec["rank"] == 16 and rec["adapter.rank"] == 16
    assert rec["code_version"] == "aaaaaaaaaaaa" and rec["effective_rank"] == records_lib.Stat(16, 0.0, 3)
  assert by_name["float base"]["merged_ppl"] == 35.767 and by_name["float base"]["n"] == 1


def test_markdown_csv_and_plots_show_mean_std_n(tmp_path):
  workdir = write_sweep(tmp_path, seeded_runs(), TABLES, [
      {"file": "bits.png", "kind": "line", "x": "bits", "y": "merged_ppl", "series": "method",
       "where": {"method": "qalora"}},
      {"file": "lines.png", "lines": [{"label": "QA-LoRA", "points": [[4, "QA-LoRA 4-bit", "merged_ppl"],
                                                                     [2, "QA-LoRA 2-bit", "merged_ppl"]]}]},
      {"file": "time.png", "kind": "bar", "x": "name", "y": "step_s"}])
  text = tables.write(workdir, log=lambda m: None)
  fmt = lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"
  step_s = [4 * 128 / t for t in TOKENS_PER_S["LoRA"]]
  assert (f"| LoRA | 35.767 | {fmt(PPL['LoRA'])} | 4,884,480 | {np.mean(step_s):.2f} ± {np.std(step_s, ddof=1):.2f} |"
          in text)
  assert "| float base | 35.767 (n=1) | 35.767 (n=1) | 4,884,480 (n=1) | - |" in text
  assert f"| qalora | {fmt(PPL['QA-LoRA 2-bit'])} | {fmt(PPL['QA-LoRA 4-bit'])} |" in text
  assert f"| QA-LoRA | {fmt(PPL['QA-LoRA 4-bit'])} | {fmt(PPL['QA-LoRA 2-bit'])} |" in text
  assert "|---|---:|---:|---:|---:|" in text  # aggregated values align as numbers
  assert ("Mean ± sample standard deviation (ddof = 1) over n = 3 seeds, or k where marked (n=k); "
          "no ± where all seeds agree.") in text
  assert "Mean ± sample standard deviation (ddof = 1) over n = 3 seeds; no ± where all seeds agree." in text
  assert "Warnings" not in text

  rows = list(csv.DictReader(io.StringIO((workdir / "tables" / "by_name.csv").read_text())))
  assert list(rows[0]) == ["name", "base_ppl", "base_ppl std", "base_ppl n", "merged_ppl", "merged_ppl std",
                           "merged_ppl n", "trainable_params", "trainable_params std", "trainable_params n",
                           "step_s", "step_s std", "step_s n"]
  for row in rows[1:]:
    ppl = PPL[row["name"]]
    assert float(row["merged_ppl"]) == pytest.approx(np.mean(ppl), abs=5e-4)
    assert float(row["merged_ppl std"]) == pytest.approx(np.std(ppl, ddof=1), abs=5e-4)
    assert int(row["merged_ppl n"]) == 3 and float(row["base_ppl std"]) == 0.0
    assert int(row["trainable_params"]) in (4884480, 2563200)
  assert rows[0]["merged_ppl"] == "35.767" and rows[0]["merged_ppl std"] == "" and rows[0]["merged_ppl n"] == "1"
  assert rows[0]["step_s"] == "-" and rows[0]["step_s n"] == "0"
  by_bits = list(csv.reader(io.StringIO((workdir / "tables" / "by_bits.csv").read_text())))
  assert by_bits[0] == ["method", "bits=2", "bits=2 std", "bits=2 n", "bits=4", "bits=4 std", "bits=4 n",
                        "bits=32", "bits=32 std", "bits=32 n"]
  assert by_bits[2][0] == "qalora" and float(by_bits[2][1]) == pytest.approx(np.mean(PPL["QA-LoRA 2-bit"]), abs=5e-4)

  for png in ("bits.png", "lines.png", "time.png"):
    assert (workdir / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  records, _, _, plots = load_records(workdir)
  for spec in plots:
    fig, ax = plt.subplots()
    plots_lib.draw(spec, records, ax)
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars, spec["file"]
    if spec["file"] == "lines.png":
      _, _, (segments,) = bars[0]
      lows = sorted(seg[0][1] for seg in segments.get_segments())
      expected = sorted(np.mean(PPL[n]) - np.std(PPL[n], ddof=1) for n in ("QA-LoRA 2-bit", "QA-LoRA 4-bit"))
      np.testing.assert_allclose(lows, expected)
    plt.close(fig)


def test_runs_of_one_cell_with_different_configs_are_an_error(tmp_path):
  runs = seeded_runs(["LoRA"])
  runs[2][2]["config"]["steps"] = 60
  runs[3][2]["config"]["adapter"]["rank"] = 8
  with pytest.raises(ValueError, match=r"cell 'LoRA': its runs differ in config fields other than seed "
                                       r"\(adapter.rank: 16, 8; steps: 50, 60\)"):
    load_records(write_sweep(tmp_path, runs))


def test_mixed_code_versions_and_machines_warn_and_still_write(tmp_path):
  runs = seeded_runs(["LoRA", "QA-LoRA 4-bit"])
  runs[0] = ("float base", None, result("float base", 0, 35.767, 0.0, new=False))
  runs[3][2]["code_version"] = "bbbbbbbbbbbb"
  runs[4][2]["machine"] = {"model": "Other CPU", "cores": 8, "flags": ["avx2", "avx512f"]}
  logged = []
  text = tables.write(write_sweep(tmp_path, runs, TABLES[:1], []), log=logged.append)
  assert logged == [
      ("warning: the results come from 3 code versions: unknown: float base; aaaaaaaaaaaa: LoRA (seeds 0, 1), "
       "QA-LoRA 4-bit (seeds 0, 1, 2); bbbbbbbbbbbb: LoRA (seed 2)"),
      ("warning: the results come from 3 machines (wall times and tokens/s are not comparable across them): "
       "unknown: float base; Test CPU, 2 cores, avx2: LoRA (seeds 0, 1, 2), QA-LoRA 4-bit (seeds 1, 2); "
       "Other CPU, 8 cores, avx2 avx512f: QA-LoRA 4-bit (seed 0)")]
  assert "Warnings:\n\n- the results come from 3 code versions: unknown: float base;" in text
  assert f"| LoRA | 35.767 | {np.mean(PPL['LoRA']):.3f} ± " in text and (tmp_path / "tables" / "by_name.csv").exists()


def test_single_runs_and_old_results_keep_the_plain_output(tmp_path):
  runs = [("LoRA", None, result("LoRA", 0, 26.2826, 41.15, new=False)),
          ("QA-LoRA 4-bit", None, result("QA-LoRA 4-bit", 0, 27.999, 51.8, new=False)),
          ("QA-LoRA 2-bit", None, "error")]
  spec = [{"title": "t", "rows": "name", "value": ["merged_ppl", "trainable_params", "effective_rank"]},
          {"title": "b", "rows": "method", "columns": "bits", "value": "merged_ppl", "file": "by_bits"}]
  logged = []
  text = tables.write(write_sweep(tmp_path, runs, spec, []), log=logged.append)
  assert text == ("### t\n\n| name | merged_ppl | trainable_params | effective_rank |\n|---|---:|---:|---:|\n"
                  "| LoRA | 26.283 | 4,884,480 | - |\n| QA-LoRA 4-bit | 27.999 | 2,563,200 | - |\n\n"
                  "### b\n\n| method | bits=4 | bits=32 |\n|---|---:|---:|\n| lora | - | 26.283 |\n"
                  "| qalora | 27.999 | - |\n\nFailed cells:\n\n- QA-LoRA 2-bit: RuntimeError: out of memory\n")
  assert logged == []
  assert (tmp_path / "tables" / "table1.csv").read_text() == (
      "name,merged_ppl,trainable_params,effective_rank\nLoRA,26.283,4884480,-\nQA-LoRA 4-bit,27.999,2563200,-\n")
  assert (tmp_path / "tables" / "by_bits.csv").read_text() == "method,bits=4,bits=32\nlora,-,26.283\nqalora,27.999,-\n"


def test_effective_rank_below_the_rank_is_noted(tmp_path):
  ranks = {"attn/q_proj": 5, "mlp/down_proj": 12}
  runs = [(n, s, result(n, s, PPL["QA-LoRA 4-bit"][s], 50.0, effective_rank=ranks if n.endswith("g128") else
                        {"attn/q_proj": 16})) for n in ("QA-LoRA g32", "QA-LoRA g128") for s in range(3)]
  runs.append(("QA-LoRA g64", 0, result("QA-LoRA g64", 0, 29.0, 50.0, effective_rank={"attn/q_proj": 9})))
  spec = [{"title": "t", "rows": "name", "value": ["merged_ppl", "effective_rank"]}]
  text = tables.write(write_sweep(tmp_path, runs, spec, []), log=lambda m: None)
  assert "| QA-LoRA g128 | " in text and " | 5 |" in text and "| QA-LoRA g64 | 29.000 (n=1) | 9 (n=1) |" in text
  assert ("Effective rank below the configured rank: QA-LoRA g128 (rank 16, 5 usable), "
          "QA-LoRA g64 (rank 16, 9 usable).") in text
  assert "effective_rank.mlp/down_proj" in load_records(tmp_path)[0][1]


def test_a_log_scaled_plot_of_unfinished_cells_is_drawn_empty(tmp_path):
  """A sweep in progress: lines whose cells have not finished are left out, and a plot with none is empty."""
  spec = {"file": "p.png", "yscale": "log", "lines": [
      {"label": "done", "points": [[4, "LoRA", "ppl"]]}, {"label": "pending", "points": [[4, "nope", "ppl"]]}]}
  records = [{"name": "LoRA", "ppl": 26.3}]
  for recs in (records, []):
    fig, ax = plt.subplots()
    plots_lib.draw(spec, recs, ax)
    assert [line.get_label() for line in ax.get_lines()] == (["done"] if recs else [])
    assert ax.get_yscale() == ("log" if recs else "linear")
    plt.close(fig)


def test_comparisons_hold_beyond_two_std_as_numpy_says(tmp_path):
  spec = {"title": "orderings", "file": "orderings",
          "compare": [["QA-LoRA 4-bit", "merged_ppl", "LoRA", "merged_ppl"],      # 29.52 vs 26.2: far apart
                      ["QA-LoRA 4-bit", "tokens_per_s", "QA-LoRA 2-bit", "tokens_per_s"],  # 52.3 vs 50: within
                      ["QA-LoRA 4-bit", "merged_ppl", "float base", "base_ppl"],  # a one-run value counts as exact
                      ["QA-LoRA 4-bit", "merged_ppl", "QA-LoRA 8-bit", "merged_ppl"]]}  # not finished
  text = tables.write(write_sweep(tmp_path, seeded_runs(), [spec]), plots=[])
  rows = list(csv.reader(io.StringIO((tmp_path / "tables" / "orderings.csv").read_text())))
  header, rows = rows[0], rows[1:]
  assert header[:2] == ["A", "B"] and header[-1] == "beyond 2 std"
  col = {h: i for i, h in enumerate(header)}
  for row, (a, b, tol) in zip(rows, [(PPL["QA-LoRA 4-bit"], PPL["LoRA"], 5e-4),  # tolerance: the printed digits
                                     (TOKENS_PER_S["QA-LoRA 4-bit"], TOKENS_PER_S["QA-LoRA 2-bit"], 0.05),
                                     (PPL["QA-LoRA 4-bit"], [35.767], 5e-4)]):
    diff = np.mean(a) - np.mean(b)
    two_s = 2 * np.sqrt(np.var(a, ddof=1) + (np.var(b, ddof=1) if len(b) > 1 else 0.0))
    assert float(row[col["A - B"]]) == pytest.approx(diff, abs=tol)
    assert float(row[col["2 s"]]) == pytest.approx(two_s, abs=tol)
    assert row[col["beyond 2 std"]] == ("yes" if abs(diff) > two_s else "no")
  assert [r[col["beyond 2 std"]] for r in rows] == ["yes", "no", "yes", "-"]  # the hand-picked cases
  assert "beyond 2 std: |A - B| > 2 s" in text and "| QA-LoRA 4-bit (merged_ppl) | LoRA (merged_ppl) |" in text
