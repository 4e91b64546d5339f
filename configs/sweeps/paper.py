"""The paper's tables on SmolLM2-135M + Shakespeare (held-out perplexity on The Tempest instead of MMLU).

    qalora sweep --config configs/sweeps/paper.py --workdir experiments/paper
    qalora table --workdir experiments/paper

Table 1 analogue: the float model; RTN and GPTQ bases at 4/3/2 bits (no fine-tuning); LoRA on the float
base; QLoRA (NF4 + double quantization); QLoRA merged into float weights and re-quantized with GPTQ at
4/3/2 bits; QA-LoRA on GPTQ g32 bases, merged into INT-k. Table 5 analogue: QA-LoRA at group size 32/64/128,
4 and 2 bits, at a rank every group size can use (see below). Table 2 analogue: trainable parameters and
time per step, QLoRA vs QA-LoRA.

Every training cell runs once per seed (arg: seeds=N, default 3: seeds 0..N-1), with the same budget:
`steps` steps of 4 x 128 tokens (arg: steps=N), AdamW at 5e-4 with 5 warm-up steps, alpha 32, adapters on
all seven linears. The seed draws the data order and the adapters' initialisation; the quantized bases do not
depend on it (GPTQ calibrates on 32 x 512 tokens of the training plays drawn with base.calibration_seed), so
the seeds of a cell share one base and its evaluation-only rows run once.

Rank. QA-LoRA's A is [ceil(in / g), r]: SmolLM2's 576-wide inputs give 18, 9 and 5 rows at g = 32, 64, 128,
so r = 16 is usable in full at g32 only. Table 1 trains r = 16 (every layer can use it at g32); Table 5
trains r = 4 (arg: group_rank=N), which every group size can use, so that the group size is not confounded
with a rank cut. (The paper's Table 5, LLaMA-13B at r = 64, has the same cut at g128: 5120 / 128 = 40 rows.)

A fourth table lists the orderings the README states and whether each holds beyond 2 standard deviations of a
single run (see qalora_jax.eval.tables: |A - B| > 2 sqrt(s_A^2 + s_B^2)).
"""

from qalora_jax.train.config import parse_arg

BITS = (4, 3, 2)
GROUPS = (32, 64, 128)
GROUP_BITS = (4, 2)


def gptq(bits, group_size=32):
  return {"base.quantizer": "gptq", "base.options": {"bits": bits, "group_size": group_size}}


def get_sweep(arg=None):
  args = {"steps": 50, "seeds": 3, "group_rank": 4} | parse_arg(arg)
  rank = args["group_rank"]
  lora = {"adapter.method": "lora", "base.quantizer": "none", "base.options": {}}
  once = {"steps": 0, "seeds": [0]}  # evaluation only: no seed changes them
  cells = [{"name": "float base", **once, **lora}]
  cells += [{"name": f"RTN {b}-bit", **once, "base.quantizer": "int", "base.options": {"bits": b, "group_size": 32}}
            for b in BITS]
  cells += [{"name": "LoRA", **lora}]
  cells += [{"name": "QLoRA", "adapter.method": "lora", "base.quantizer": "nf4",
             "base.options": {"block_size": 64, "double_quant": True},
             "requantize": tuple(f"gptq:bits={b},group_size=32" for b in BITS)}]
  cells += [{"name": f"QA-LoRA {b}-bit g32", **gptq(b)} for b in BITS]
  cells += [{"name": f"QA-LoRA {b}-bit g{g} r={rank}", **gptq(b, g), "adapter.rank": rank}
            for g in GROUPS for b in GROUP_BITS]

  cols = [f"{b}-bit" for b in BITS]
  table1 = {
      "title": "Table 1 analogue: held-out perplexity (The Tempest, 8192 tokens), SmolLM2-135M",
      "file": "table1", "corner": "method", "columns": ["fp32"] + cols,
      "layout": [
          {"row": "base, no fine-tuning", "cells": {"fp32": ["float base", "base_ppl"]}},
          {"row": "RTN g32 base, no fine-tuning", "cells": {f"{b}-bit": [f"RTN {b}-bit", "base_ppl"] for b in BITS}},
          {"row": "GPTQ g32 base, no fine-tuning",
           "cells": {f"{b}-bit": [f"QA-LoRA {b}-bit g32", "base_ppl"] for b in BITS}},
          {"row": "LoRA (float base)", "cells": {"fp32": ["LoRA", "ppl"]}},
          {"row": "QLoRA (NF4 + DQ base, adapters unmerged)", "cells": {"4-bit": ["QLoRA", "ppl"]}},
          {"row": "QLoRA merged into float weights", "cells": {"fp32": ["QLoRA", "merged_ppl"]}},
          {"row": "QLoRA w/ GPTQ (merged, re-quantized g32)",
           "cells": {f"{b}-bit": ["QLoRA", f"requantized_ppl.gptq:bits={b},group_size=32"] for b in BITS}},
          {"row": "QA-LoRA (GPTQ g32 base), adapters unmerged",
           "cells": {f"{b}-bit": [f"QA-LoRA {b}-bit g32", "ppl"] for b in BITS}},
          {"row": "QA-LoRA (GPTQ g32 base), merged: pure INT-k",
           "cells": {f"{b}-bit": [f"QA-LoRA {b}-bit g32", "merged_ppl"] for b in BITS}},
      ],
  }
  table5 = {
      "title": f"Table 5 analogue: QA-LoRA group size at r = {rank} (usable at every group size), merged held-out "
               "perplexity, and the GPTQ base before tuning",
      "file": "table5", "corner": "group size",
      "columns": ["4-bit", "2-bit", "4-bit base", "2-bit base", "effective rank"],
      "layout": [{"row": str(g), "cells": {
          "4-bit": [f"QA-LoRA 4-bit g{g} r={rank}", "merged_ppl"],
          "2-bit": [f"QA-LoRA 2-bit g{g} r={rank}", "merged_ppl"],
          "4-bit base": [f"QA-LoRA 4-bit g{g} r={rank}", "base_ppl"],
          "2-bit base": [f"QA-LoRA 2-bit g{g} r={rank}", "base_ppl"],
          "effective rank": [f"QA-LoRA 4-bit g{g} r={rank}", "effective_rank"]}}
          for g in GROUPS],
  }
  columns2 = {"trainable params": "trainable_params", "time per step (s)": "step_s", "tokens/s": "tokens_per_s",
              "frozen base bytes": "frozen_bytes", "merged model bytes": "merged_bytes"}
  table2 = {
      "title": "Table 2 analogue: trainable parameters and time per step (4 x 128 tokens, this machine)",
      "file": "table2", "corner": "method", "columns": list(columns2),
      "layout": [{"row": row, "cells": {c: [cell, m] for c, m in columns2.items()}}
                 for row, cell in (("LoRA (float base)", "LoRA"), ("QLoRA (NF4 + DQ)", "QLoRA"),
                                   ("QA-LoRA (INT4 g32)", "QA-LoRA 4-bit g32"))],
  }
  requantized = "requantized_ppl.gptq:bits={},group_size=32"
  orderings = {
      "title": "The orderings the README states: which hold beyond 2 standard deviations",
      "file": "orderings",
      "compare": [[f"QA-LoRA {b}-bit g32", "merged_ppl", "QLoRA", requantized.format(b)] for b in BITS]
      + [["QA-LoRA 4-bit g32", "merged_ppl", "QLoRA", "ppl"],
         ["LoRA", "ppl", "QLoRA", "ppl"],
         ["LoRA", "ppl", "QA-LoRA 4-bit g32", "merged_ppl"]]
      + [[f"QA-LoRA {b}-bit g{small} r={rank}", "merged_ppl", f"QA-LoRA {b}-bit g{large} r={rank}", "merged_ppl"]
         for b in GROUP_BITS for small, large in zip(GROUPS, GROUPS[1:])]
      # the worst tuned 4-bit models against the float model before tuning; QA-LoRA against its own GPTQ base
      + [["QLoRA", requantized.format(4), "float base", "base_ppl"],
         [f"QA-LoRA 4-bit g128 r={rank}", "merged_ppl", "float base", "base_ppl"]]
      + [[f"QA-LoRA {b}-bit g32", "merged_ppl", f"QA-LoRA {b}-bit g32", "base_ppl"] for b in BITS],
  }
  wall_times = {"title": "Wall time of each cell (this machine; other work shared its cores)", "file": "wall_times",
                "rows": "name", "value": ["steps", "wall_s"]}
  plots = [
      {"file": "ppl_vs_bits.png", "title": "held-out perplexity vs bits (g32)", "xlabel": "bits",
       "ylabel": "perplexity (log scale)", "yscale": "log",
       "lines": [{"label": "RTN base", "points": [[b, f"RTN {b}-bit", "base_ppl"] for b in BITS]},
                 {"label": "GPTQ base", "points": [[b, f"QA-LoRA {b}-bit g32", "base_ppl"] for b in BITS]},
                 {"label": "QLoRA w/ GPTQ",
                  "points": [[b, "QLoRA", f"requantized_ppl.gptq:bits={b},group_size=32"] for b in BITS]},
                 {"label": "QA-LoRA merged", "points": [[b, f"QA-LoRA {b}-bit g32", "merged_ppl"] for b in BITS]}]},
      {"file": "ppl_vs_group_size.png", "title": f"QA-LoRA merged perplexity vs group size (r = {rank})",
       "xlabel": "group size", "ylabel": "perplexity (log scale)", "yscale": "log",
       "lines": [{"label": f"{b}-bit", "points": [[g, f"QA-LoRA {b}-bit g{g} r={rank}", "merged_ppl"]
                                                  for g in GROUPS]} for b in GROUP_BITS]},
      {"file": "trainable_params.png", "kind": "bar", "x": "name", "y": "trainable_params",
       "where": {"name": ["LoRA", "QLoRA", "QA-LoRA 4-bit g32"]}, "title": "trainable parameters"},
      {"file": "step_time.png", "kind": "bar", "x": "name", "y": "step_s",
       "where": {"name": ["LoRA", "QLoRA", "QA-LoRA 4-bit g32"]}, "title": "seconds per step (4 x 128 tokens)"},
  ]
  return {
      "config": "configs/quickstart.py",
      "overrides": {"steps": args["steps"], "optim.warmup_steps": 5, "checkpoint_every": 25, "sample_prompt": "",
                    "base.calibration": 32, "base.calibration_len": 512},
      "seeds": list(range(args["seeds"])), "cells": cells, "tables": [table1, table5, table2, orderings, wall_times],
      "plots": plots,
  }
