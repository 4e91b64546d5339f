"""experiments/perf_vs_peers.py: ratios taken within rounds, targets judged on them (README.md's tables are
checked against the committed results by tests/test_readme_figures.py)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import perf_vs_peers as perf  # noqa: E402

CPU = {"model": "Test CPU", "cores": 2, "flags": ["avx512f"]}


def _line(run, rnd, tps, rss=1000.0):
  return {"run": run, "round": rnd, "tokens_per_s": tps, "maxrss_mb": rss, "cpu": CPU}


def test_ratios_are_taken_within_rounds_not_between_medians():
  # Round 0 is slow for both, round 1 fast for both, round 2 only the peer is fast.
  lines = [_line("ours qalora", 0, 100), _line("peer qlora bf16", 0, 50),
           _line("ours qalora", 1, 300), _line("peer qlora bf16", 1, 200),
           _line("ours qalora", 2, 110), _line("peer qlora bf16", 2, 220)]
  target = perf.TARGETS[0]
  ratios = perf.within_round_ratios(lines, target)
  assert ratios == pytest.approx([2.0, 1.5, 0.5])
  text = perf.tables(lines)
  # median of within-round ratios is 1.5 (met); the ratio of medians would be 110 / 200 = 0.55
  assert "| 1.50x [0.50-2.00] | >= 1.5x | yes |" in text
  assert "Test CPU, 2 cores, avx512f" in text
  assert "Not measured in this run: " in text and target.label not in text.split("Not measured")[1]


def test_a_round_missing_one_side_is_left_out_and_memory_targets_are_upper_bounds():
  lines = [_line("ours qalora remat", 0, 1, rss=500), _line("peer qlora bf16", 0, 1, rss=1000),
           _line("ours qalora remat", 1, 1, rss=600)]
  rss = next(t for t in perf.TARGETS if t.field == "maxrss_mb" and t.num == "ours qalora remat")
  assert perf.within_round_ratios(lines, rss) == [0.5]
  assert rss.met(0.5) and not rss.met(0.6)



def test_the_bound_at_the_matmul_peak_and_the_perplexity_ratio():
  # ours: 200 tokens/s at MFU 0.8, so at most 250 at the peak; the peer: 100 tokens/s
  lines = [{**_line("ours qalora fp32", 0, 200), "mfu": 0.8}, _line("peer qlora fp32", 0, 100),
           {"run": "ours perplexity int8 path", "round": 0, "ppl": 36.5, "maxrss_mb": 900.0, "cpu": CPU},
           {"run": "ours perplexity float32 matmuls", "round": 0, "ppl": 36.0, "maxrss_mb": 900.0, "cpu": CPU}]
  bound = next(t for t in perf.TARGETS if t.field == "tokens_per_s_at_peak")
  assert perf.within_round_ratios(lines, bound) == pytest.approx([2.5])
  ppl = next(t for t in perf.TARGETS if t.field == "ppl")
  assert perf.within_round_ratios(lines, ppl) == pytest.approx([36.5 / 36.0])
  text = perf.tables(lines)
  assert f"| {bound.label} | 2.50x | - | - |" in text  # a bound has no goal
  assert f"| {ppl.label} | 1.014x | <= 1.01x | no |" in text
  assert "| ours perplexity int8 path | - | 900 | - | - | 36.500 |" in text


def test_matmul_shapes_weights_each_product_by_its_count_in_a_step():
  import matmul_shapes as ms

  # hand count at 4 x 128 (512 rows): a layer's seven linears hold 2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536
  # = 3,538,944 weights; each runs forward and input gradient (2 x 2 x 512 FLOPs a weight), 30 layers; the
  # head 576 x 49,152 the same twice: 217.4 + 58.0 GFLOP, i.e. 275.4 ms at 1,000 GFLOP/s
  flops = 30 * 2 * 2 * 512 * 3_538_944 + 2 * 2 * 512 * 576 * 49_152
  assert ms.step_ms({name: 1000.0 for name, *_ in ms.SHAPES}) == pytest.approx(flops / 1e9)
  rates = {name: 1000.0 for name, *_ in ms.SHAPES}
  rates["down forward"] = 500.0  # one shape at half the rate adds its own time once more
  assert ms.step_ms(rates) - ms.step_ms({n: 1000.0 for n in rates}) == pytest.approx(30 * 2 * 512 * 1536 * 576 / 1e9)


def test_matmul_shapes_tables_each_float32_library_with_its_error():
  import matmul_shapes as ms

  cpu = {"model": "X", "cores": 2, "flags": ["amx_bf16"]}
  rates = {"xla": 100.0, "ours": 200.0, "ours-amx": 300.0, "torch": 150.0}
  lines = [{"round": r, "shape": name, "library": lib, "dtype": "float32", "gflop_s": rate, "cpu": cpu,
            "error": 1e-6 * (i + 1)} for r in range(2) for name, *_ in ms.SHAPES
           for i, (lib, rate) in enumerate(rates.items())]
  lines += [{"round": r, "shape": name, "library": lib, "dtype": "bfloat16", "gflop_s": 400.0, "cpu": cpu}
            for r in range(2) for name, *_ in ms.SHAPES for lib in ("xla", "torch")]
  text = ms.tables(lines)
  assert "| ours (AVX512) f32 | ours (AMX) f32 | torch f32 | XLA / torch | ours (AVX512) / torch | ours (AMX) / torch" \
      in text
  assert "| down forward | [512, 1536] x [1536, 576] | 30 | 100 | 200 | 300 | 150 | 0.67x | 1.33x | 2.00x |" in text
  assert "| down forward | 1.0e-06 | 2.0e-06 | 3.0e-06 | 4.0e-06 |" in text
  # without AMX the column is not there
  assert "AMX" not in ms.tables([x for x in lines if x["library"] != "ours-amx"])


def test_a_llamacpp_run_without_its_repacked_layouts_is_said_so():
  import llamacpp_decode

  out = llamacpp_decode.tagged('{"tokens_per_s": 100.0}\nnot json\n', extra_buffer_types=False, released_signal=11)
  assert out.splitlines()[0] == '{"tokens_per_s": 100.0, "extra_buffer_types": false, "released_signal": 11}'
  assert out.splitlines()[1] == "not json"
  lines = [{**_line("llama.cpp decode", 0, 100), "extra_buffer_types": False, "released_signal": 11},
           _line("ours decode qalora-merged", 0, 200)]
  assert "without its extra weight buffer types (repacked and AMX layouts) in 1 of 1 rounds: as released it " \
         "died of signal 11" in perf.tables(lines)
  assert "extra weight buffer types" not in perf.tables([_line("llama.cpp decode", 0, 100)])
