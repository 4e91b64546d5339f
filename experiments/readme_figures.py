"""The figures that README.md and experiments/*/README.md quote from committed results, and their check.

    python experiments/readme_figures.py           # refill every generated block, then list what differs
    python experiments/readme_figures.py --check   # only list what differs (exit status 1 when anything does)

Three things are checked (tests/test_readme_figures.py runs the same check), reading committed files only:

- every generated block of the documents (qalora_jax.readme) holds its file exactly;
- those files are what their results give: a sweep's tables.md is what `qalora table` makes of its cells,
  experiments/perf/perf_vs_peers.md what experiments/perf_vs_peers.py makes of its .jsonl;
- every figure quoted in the documents' prose (FIGURES) is what its result gives.

A figure that quotes a result is added to FIGURES with the words around it; a table of results goes into a
generated block. After a sweep is re-run: `qalora table --workdir DIR`, then this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import perf_vs_peers
from qalora_jax import readme
from qalora_jax.readme import Figure

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/README.md"))
SWEEPS = ["experiments/paper", "experiments/quantizers"]  # sweeps whose tables.md a document shows
PERF = "experiments/perf/perf_vs_peers.jsonl"
REPORT = "experiments/quantize_report/smollm2.jsonl"  # `qalora quantize-report --json` lines, commands included
GPTQ = "experiments/quantize_report/gptq_vs_rtn.jsonl"  # experiments/gptq_report.py --out
NF_MERGE = "experiments/quantize_report/nf_offset_merge.jsonl"  # experiments/nf_offset_merge.py lines
GPU_CHECK = "experiments/gpu/results/2026-11-30-h200/check.jsonl"  # every stage of experiments/gpu/run.sh
GPU_DECODING = "experiments/gpu/results/2026-11-30-h200-decoding-blocks/check.jsonl"  # with the tuned blocks
FOLD_AB = "experiments/perf/fold_ab.jsonl"  # experiments/ab_bench.py --old e4133dc --only "train qalora fp32"
AMX_AB = "experiments/perf/amx_ab.jsonl"  # experiments/ab_bench.py --old 6450309 --only "train qalora fp32"
MATMULS = "experiments/perf/matmul_shapes.jsonl"  # experiments/matmul_shapes.py
NF4 = {"block_size": 64, "double_quant": False}
NF4_DQ = {"block_size": 64, "double_quant": True}


def e(x: float, digits: int = 2) -> str:
  """Scientific notation as the documents write it: 1.40e-2 (no padded exponent)."""
  mantissa, exponent = f"{x:.{digits}e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def row(rows: list[dict], **match) -> dict:
  """The one row of a JSON-lines result whose fields equal `match` (KeyError when none or several do)."""
  hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  if len(hits) != 1:
    raise KeyError(f"{len(hits)} rows with {match}")
  return hits[0]


def value(rows: list[dict], name: str, fmt: str, **match) -> str:
  """Field `name` of the one row matching `match`, formatted."""
  return format(row(rows, **match)[name], fmt)


def median_ratio(lines: list[dict], num: str, den: str, field: str = "tokens_per_s") -> str:
  """The median of num / den within each round of a perf_vs_peers.jsonl, as its tables take ratios."""
  ratio = perf_vs_peers.Target("", num, den, field, ">= 0")
  ratios = perf_vs_peers.within_round_ratios([x for x in lines if "error" not in x], ratio)
  return f"{statistics.median(ratios):.2f}"


def ab_ratio(lines: list[dict]) -> tuple[str, ...]:
  """An A/B's median new / old tokens/s over its rounds (ratios within a round), and the number of rounds."""
  by_round = {(x["round"], x["side"]): x["tokens_per_s"] for x in lines}
  rounds = sorted({x["round"] for x in lines})
  return f"{statistics.median(by_round[r, 'new'] / by_round[r, 'old'] for r in rounds):.2f}", str(len(rounds))


def amx_matmuls(lines: list[dict]) -> tuple[str, ...]:
  """The step's float32 matmul time on AMX over the AVX512 kernel's and over PyTorch's, and the largest error
  against float64 on AMX, with AVX512, XLA and PyTorch (matmul_shapes.py's lines)."""
  import matmul_shapes

  rates = {}
  for x in lines:
    if x["dtype"] == "float32":
      rates.setdefault(x["library"], {}).setdefault(x["shape"], []).append(x["gflop_s"])
  ms = {lib: matmul_shapes.step_ms({s: statistics.median(v) for s, v in by_shape.items()})
        for lib, by_shape in rates.items()}
  worst = {lib: max(x["error"] for x in lines if x["library"] == lib and "error" in x) for lib in rates}
  return (f"{ms['ours-amx'] / ms['ours']:.2f}", f"{ms['ours-amx'] / ms['torch']:.2f}", e(worst["ours-amx"], 1),
          e(worst["ours"], 1), e(worst["xla"], 1), e(worst["torch"], 1))


def largest_spread(lines: list[dict]) -> str:
  """The largest max / min - 1 of one run's tokens/s over the rounds, in percent."""
  runs = {}
  for x in lines:
    if "tokens_per_s" in x:
      runs.setdefault(x["run"], []).append(x["tokens_per_s"])
  return f"{max(max(v) / min(v) - 1 for v in runs.values() if len(v) > 1) * 100:.0f}"


def checkpoints(cells: dict) -> tuple[str, ...]:
  r = cells["QA-LoRA 4-bit g32"]
  return (f"{r['adapter_bytes']:,}", f"{r['adapter_checkpoint_bytes'] / r['adapter_bytes']:.1f}",
          f"{r['checkpoint_bytes'] / r['adapter_bytes']:.1f}")


def error(rows: list[dict], quantizer: str, bits: int, group_size: int, digits: int = 2, **options) -> str:
  r = row(rows, quantizer=quantizer, bits=bits, group_size=group_size, **options)
  return "0" if r["weight_rel_error"] == 0 else e(r["weight_rel_error"], digits)


def pow2(rows: list[dict]) -> tuple[str, ...]:
  p = {(b, g): row(rows, quantizer="pow2-int", bits=b, group_size=g) for b in (4, 3) for g in (32, 128)}
  return (f"{p[4, 32]['bits_per_weight']:.2f}", f"{p[4, 128]['bits_per_weight']:.2f}",
          e(p[4, 32]["weight_rel_error"]), e(p[4, 128]["weight_rel_error"]),
          error(rows, "int", 4, 32), error(rows, "int", 4, 128),
          f"{p[3, 32]['bits_per_weight']:.2f}", f"{p[3, 128]['bits_per_weight']:.2f}",
          e(p[3, 32]["weight_rel_error"]), e(p[3, 128]["weight_rel_error"]))


def int_mse_table(rows: list[dict]) -> tuple[str, ...]:
  out = []
  for bits in (4, 3, 2):
    for g in (128, 64):
      a = row(rows, quantizer="int", bits=bits, group_size=g)["weight_rel_error"]
      b = row(rows, quantizer="int-mse", bits=bits, group_size=g)["weight_rel_error"]
      out += [e(a, 3), e(b, 3), f"{b / a:.3f}"]
  return tuple(out)


def report_table(rows: list[dict]) -> tuple[str, ...]:
  """The quantization report's rows as the README lays them out (int's 4-bit g32 error is written out)."""
  settings = [dict(quantizer="int", bits=b, group_size=g) for b in (4, 3, 2) for g in (32, 64, 128)]
  settings += [dict(quantizer="nf4", bits=4, group_size=64, options=NF4),
               dict(quantizer="nf4", bits=4, group_size=64, options=NF4_DQ),
               dict(quantizer="fp4", bits=4, group_size=64)]
  out = []
  for s in settings:
    r = row(rows, **s)
    out += [f"{r['bits_per_weight']:.3f}", f"{r['bytes']:,}"]
    if r["weight_rel_error"] != 0:
      out.append(f"{r['weight_rel_error']:.3e}")
  return tuple(out)


def nf_offset_errors(rows: list[dict]) -> tuple[str, ...]:
  out = []
  for bits in (4, 3, 2):
    out += [error(rows, "nf-offset", bits, 64), error(rows, "nf-offset", bits, 32)]
    if bits == 4:
      out.append(error(rows, "nf4", 4, 64, options=NF4))
    else:
      out += [error(rows, "int", bits, 64), error(rows, "int", bits, 32)]
  return tuple(out)


def nf_offset_merge(lines: list[dict]) -> tuple[str, ...]:
  g32, g64 = row(lines, group_size=32), row(lines, group_size=64)
  return (e(g32["max_abs_logit_diff"]), f"{g32['max_abs_logit']:.1f}", e(g32["ratio"], 1), e(g64["ratio"], 1),
          f"{g32['ppl_base']:.2f}", f"{g32['ppl_unmerged']:.6f}", f"{g32['ppl_merged']:.6f}")


def gptq_table(rows: list[dict]) -> tuple[str, ...]:
  out = []
  for bits, g in ((4, 128), (3, 128), (2, 64)):
    rtn = row(rows, quantizer="int", bits=bits, group_size=g)
    ours = row(rows, quantizer="gptq", bits=bits, group_size=g)
    out += [e(rtn["output_rel_error"], 3), e(ours["output_rel_error"], 3),
            f"{ours['output_rel_error'] / rtn['output_rel_error']:.3f}", _ppl(rtn["ppl"]), _ppl(ours["ppl"])]
  return tuple(out)


def _ppl(x: float) -> str:
  """Perplexity to four significant figures, whole numbers from 1,000 on (53.60, 450.6, 3,276)."""
  return f"{x:,.0f}" if x >= 1000 else f"{x:.{4 - len(str(int(x)))}f}"


def _only(rows: list[dict], name: str, **match):
  """Field `name` of the one row that has it (and equals `match`)."""
  return row([r for r in rows if name in r], **match)[name]


def gpu_training(rows: list[dict]) -> tuple[str, ...]:
  qalora, lora = row(rows, stage="train", method="qalora"), row(rows, stage="train", method="lora")
  return (f"{qalora['step_s'] * 1e3:.0f}", f"{100 * qalora['mfu_measured_peak']:.1f}",
          value(rows, "tflops", ".0f", ceiling="bf16 matmul"), f"{100 * qalora['mfu_datasheet_peak']:.1f}",
          f"{lora['step_s'] * 1e3:.0f}", f"{_only(rows, 'qalora_over_lora'):.2f}")


def gpu_decoding(rows: list[dict]) -> tuple[str, ...]:
  kernel, xla = row(rows, stage="decode", path="kernel"), row(rows, stage="decode", path="xla")
  layer = row(rows, stage="microbench", shape=[4096, 14336], group_size=32, m=1, transpose=False)
  return (f"{kernel['ms_per_token']:.2f}", f"{xla['ms_per_token']:.2f}",
          f"{_only(rows, 'xla_over_kernel', stage='decode'):.2f}", f"{kernel['gb_s']:.0f}",
          f"{100 * kernel['copy_fraction']:.0f}",
          value(rows, "gb_s", ".0f", ceiling="copy y = x + 1"), f"{layer['kernel']['us']:.1f}",
          f"{100 * layer['kernel']['copy_fraction']:.0f}", f"{layer['xla_over_kernel']:.2f}")


def cell(name: str, field: str, fmt: str):
  """The values function of one field of a sweep cell, formatted."""
  return lambda cells: (format(cells[name][field], fmt),)


FIGURES = [
    # README.md
    Figure("README.md", "all seven linears ({} adapter bytes), the adapter checkpoint takes {}x that on disk "
           "(orbax compresses) and a training checkpoint {}x", "experiments/paper", checkpoints),
    Figure("README.md", "accumulated in float32: {}x the training tokens/s of float32 matmuls, and "
           "`--config.model.remat=true` runs at {}x the speed in {}x the peak memory", PERF,
           lambda lines: (median_ratio(lines, "ours qalora", "ours qalora fp32"),
                          median_ratio(lines, "ours qalora remat", "ours qalora"),
                          median_ratio(lines, "ours qalora remat", "ours qalora", "maxrss_mb"))),
    Figure("README.md", "QA-LoRA on an INT4 g32 base takes {} ms a step, {}% MFU of the {} TFLOP/s bf16 product "
           "measured on the same GPU (target: 35%), {}% of the datasheet's 989. LoRA on the same base takes {} ms: "
           "QA-LoRA / LoRA step time {}", GPU_CHECK, gpu_training),
    Figure("README.md", "{} ms a token with the INT4 kernel against {} ms on XLA's path ({}x), {} GB/s of every "
           "parameter and the KV cache, {}% of the {} GB/s copy bandwidth. - The kernel at one row on a 4096 x "
           "14336 layer: {} us, {}% of the copy bandwidth (target: 60%, not met), {}x XLA's.", GPU_DECODING,
           gpu_decoding),
    Figure("README.md", "Its error against float64: at most {} (target: 1e-5)", GPU_CHECK,
           lambda rows: (e(max(r["rel_error"] for r in rows if r["stage"] == "correctness" and "rel_error" in r)),)),
    Figure("README.md", "instead of recomputing their projections: at 1 x 2048 {}x the tokens/s of plain remat in {}x "
           "its peak memory", PERF,
           lambda lines: (median_ratio(lines, "ours qalora remat-keep 1x2048", "ours qalora remat 1x2048"),
                          median_ratio(lines, "ours qalora remat-keep 1x2048", "ours qalora remat 1x2048",
                                       "maxrss_mb"))),
    Figure("README.md", "gone: with q/k/v below, {}x the float32 step's\n  tokens/s of the code before them (median of "
           "{} alternating rounds", FOLD_AB, ab_ratio),
    Figure("README.md", "At the step's shapes the matmuls then take {}x\n  the AVX512 kernel's time and {}x PyTorch's "
           "float32 time, with errors against float64 of at most {} of\n  the largest entry (AVX512: {}, XLA's "
           "float32 dot: {}, PyTorch's: {};", MATMULS, amx_matmuls),
    Figure("README.md", "all-float32 step runs at {}x the\n  tokens/s of the AVX512 kernel's (median of {} alternating "
           "rounds", AMX_AB, ab_ratio),
    Figure("README.md", "the same bench varies by up to {}% between rounds", PERF,
           lambda lines: (largest_spread(lines),)),
    Figure("README.md", "On SmolLM2 `pow2-int` costs {} / {} bits a weight at 4-bit g32 / g128 (an 8-bit exponent "
           "instead of a 16-bit scale) for a weight error of {} / {} (`int`: {} / {}), {} / {} bits at 3-bit for "
           "{} / {}.", REPORT, pow2),
    Figure("README.md", "| bits | g128 int | g128 int-mse | ratio | g64 int | g64 int-mse | ratio |\n"
           "|---:|---:|---:|---:|---:|---:|---:|\n"
           "| 4 | {} | {} | {} | {} | {} | {} |\n| 3 | {} | {} | {} | {} | {} | {} |\n"
           "| 2 | {} | {} | {} | {} | {} | {} |", REPORT, int_mse_table),
    Figure("README.md", "linears, lr 5e-4), the merged model's logits on 4 x 128 held-out tokens differ from the "
           "unmerged ones by at most {} for a largest |logit| of {} ({} of it; g64: {}), perplexity {} (base) -> "
           "{} (unmerged) -> {} (merged)", NF_MERGE, nf_offset_merge),
    Figure("README.md", "NF4 {} / {} (absmax `nf4` block 64: {}), NF3 {} / {} (INT3: {} / {}), NF2 {} / {} (INT2: "
           "{} / {}: four levels", REPORT, nf_offset_errors),
    Figure("README.md", "projections at g128 have four groups of 128 and one of 64 ({} bits a weight over the "
           "whole model)", REPORT,
           lambda rows: (value(rows, "bits_per_weight", ".3f", quantizer="int", bits=4, group_size=128),)),
    Figure("README.md", "absmax values in 8 bits as bitsandbytes does (NF4 block 64: {} bits a weight)", REPORT,
           lambda rows: (value(rows, "bits_per_weight", ".3f", quantizer="nf4", options=NF4_DQ),)),
    Figure("README.md", "perplexity on The Tempest, float32 model {}):", GPTQ,
           lambda rows: (f"{rows[0]['float_ppl']:.2f}",)),
    Figure("README.md", "| bits | group | RTN output error | GPTQ output error | GPTQ / RTN | RTN ppl | GPTQ ppl |\n"
           "|---:|---:|---:|---:|---:|---:|---:|\n"
           "| 4 | 128 | {} | {} | {} | {} | {} |\n| 3 | 128 | {} | {} | {} | {} | {} |\n"
           "| 2 | 64 | {} | {} | {} | {} | {} |", GPTQ, gptq_table),
    Figure("README.md", "| quantizer | bits | group | bits/weight | bytes | weight rel. error |\n"
           "|---|---:|---:|---:|---:|---:|\n"
           "| int | 4 | 32 | {} | {} | 0 (Q4_1 grid, see above) |\n"
           "| int | 4 | 64 | {} | {} | {} |\n| int | 4 | 128 | {} | {} | {} |\n"
           "| int | 3 | 32 | {} | {} | {} |\n| int | 3 | 64 | {} | {} | {} |\n| int | 3 | 128 | {} | {} | {} |\n"
           "| int | 2 | 32 | {} | {} | {} |\n| int | 2 | 64 | {} | {} | {} |\n| int | 2 | 128 | {} | {} | {} |\n"
           "| nf4 | 4 | 64 | {} | {} | {} |\n| nf4 + double quant | 4 | 64 | {} | {} | {} |\n"
           "| fp4 | 4 | 64 | {} | {} | {} |", REPORT, report_table),
    # experiments/paper/README.md: storage, trainable parameters, the float and RTN bases (seed-independent); the
    # orderings are its generated orderings table.
    Figure("experiments/paper/README.md", "QA-LoRA's model is a pure INT4 tree of {} MB. QLoRA's needs its {} MB "
           "float merge", "experiments/paper",
           lambda c: (f"{c['QA-LoRA 4-bit g32']['merged_bytes'] / 1e6:.1f}",
                      f"{c['QLoRA']['merged_bytes'] / 1e6:.0f}")),
    Figure("experiments/paper/README.md", "better than the float model before tuning ({})", "experiments/paper",
           lambda c: (f"{c['float base']['base_ppl']:.2f}",)),
    Figure("experiments/paper/README.md", "**QA-LoRA trains fewer parameters.** {} against {} for (Q)LoRA, a "
           "ratio of {}.", "experiments/paper",
           lambda c: (f"{c['QA-LoRA 4-bit g32']['trainable_params']:,}", f"{c['LoRA']['trainable_params']:,}",
                      f"{c['QA-LoRA 4-bit g32']['trainable_params'] / c['LoRA']['trainable_params']:.2f}")),
    Figure("experiments/paper/README.md", "RTN at 4-bit g32 reproduces them exactly ({}, the float model)",
           "experiments/paper", cell("RTN 4-bit", "base_ppl", ".3f")),
    # experiments/quantizers/README.md: the bases without calibration (int, int-mse, nf-offset)
    Figure("experiments/quantizers/README.md", "their base is the float model itself ({})", "experiments/quantizers",
           cell("QA-LoRA int 4-bit", "base_ppl", ".3f")),
    Figure("experiments/quantizers/README.md", "GPTQ ({}) and the NF4 codebook ({}) move off the grid",
           "experiments/quantizers", lambda c: (f"{c['QA-LoRA gptq 4-bit']['base_ppl']:.3f}",
                                                f"{c['QA-LoRA nf-offset 4-bit']['base_ppl']:.2f}")),
    Figure("experiments/quantizers/README.md", "`nf-offset` {}; GPTQ {}, calibrated on data",
           "experiments/quantizers", lambda c: tuple(f"{c[f'QA-LoRA {q} 3-bit']['base_ppl']:.1f}"
                                                     for q in ("nf-offset", "gptq"))),
    Figure("experiments/quantizers/README.md", "`int` {}; `int-mse` {}, because clipping the range per group removes "
           "a third of the loss; `nf-offset` {};", "experiments/quantizers",
           lambda c: tuple(f"{c[f'QA-LoRA {q} 3-bit']['base_ppl']:.1f}" for q in ("int", "int-mse", "nf-offset"))),
    Figure("experiments/quantizers/README.md", "merged vs unmerged max |diff| is {} x max |logit| with float32 "
           "offsets", NF_MERGE, lambda lines: (e(row(lines, group_size=32)["ratio"], 1),)),
]


def stale_files() -> list[str]:
  """One line for each committed generated file that is not what its results give."""
  from qalora_jax.eval import tables

  problems = []
  with tempfile.TemporaryDirectory() as tmp:
    for sweep in SWEEPS:
      made = tables.write(ROOT / sweep, plots=[], out=Path(tmp) / sweep)
      problems += _compare(f"{sweep}/tables.md", made, f"qalora table --workdir {sweep}")
  made = perf_vs_peers.rewrite(ROOT / PERF)
  problems += _compare("experiments/perf/perf_vs_peers.md", made, "experiments/perf_vs_peers.py (its rewrite())")
  return problems


def _compare(path: str, made: str, command: str) -> list[str]:
  diff = readme.first_difference((ROOT / path).read_text(), made)
  if diff is None:
    return []
  i, got, want = diff
  return [f"{path}:{i + 1}: the committed file has {got}, its results give {want}; run {command}"]


def problems() -> list[str]:
  """Every difference between the documents and the committed results (empty when they agree)."""
  out = []
  for doc in DOCS:
    out += readme.check_blocks(ROOT / doc, doc)
  return out + stale_files() + readme.check_figures(FIGURES, ROOT)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="change nothing; list what differs")
  args = parser.parse_args()
  if not args.check:
    for doc in DOCS:
      readme.fill(ROOT / doc)
  found = problems()
  for line in found:
    print(line)
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main())
