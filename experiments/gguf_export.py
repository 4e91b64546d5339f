"""SmolLM2-135M after a short QA-LoRA run (the quickstart config, INT4 g32 and g64 bases), merged and exported
as GGUF: does the file hold exactly the merged model?

    python experiments/gguf_export.py [--steps 30] [--group-size 32 64] [--llamacpp-python PY]

Per setting: train `--steps` steps (loop.train_steps: the run's batches, no evaluation), merge (QA-LoRA into
the offsets), export with `export.gguf.export_gguf` (source: SmolLM2's own Q4_1 GGUF), then
  - read the file back with `models.load(path, keep_quantized=True)`: every QTensor's codes, scales and
    offsets, and every float leaf, compared bit for bit with the merged model's;
  - load the file with transformers' GGUF loader (its own dequantization): logits on three 96-token windows of
    The Tempest against our merged model's (float32 matmuls), max |diff| / max |logit| (target <= 1e-4), and
    32 greedy tokens from one prompt;
  - file size against the source GGUF's.
With --llamacpp-python (an environment with llama-cpp-python; not a dependency of this project), llama.cpp
also runs each exported file: its 32 greedy tokens against ours (float32 and int8-activation matmuls), and its
decoding speed on the exported file against the source GGUF (shared/bench/peer_llamacpp_decode.py,
alternately, 3 rounds). A first row exports SmolLM2 itself (its Q4_1 block linears read as QTensors): the tensors
should be the source's byte for byte. Writes experiments/gguf_export.json and experiments/gguf_export.md.

Note: SmolLM2's released weights already sit on a Q4_1 (asymmetric 4-bit, group-32, float16) grid, so the
INT4 g32 base is nearly the released weights; g64 is the setting that does not flatter the base.
"""

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from qalora_jax import assets, models, quant, tree_paths
from qalora_jax.export.gguf import export_gguf
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop

HERE = Path(__file__).parent


def compare_params(a: dict, b: dict) -> dict:
  """Counts of QTensors and float leaves, and of those not equal bit for bit."""
  a, b = dict(tree_paths.flatten(a)), dict(tree_paths.flatten(b))
  assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
  counts = {"qtensors": 0, "qtensors_differing": 0, "float_leaves": 0, "float_leaves_differing": 0}
  for path, x in a.items():
    y = b[path]
    if isinstance(x, quant.QTensor):
      counts["qtensors"] += 1
      same = x.meta == y.meta and sorted(x.arrays) == sorted(y.arrays) and all(
          np.asarray(x[k]).dtype == np.asarray(y[k]).dtype
          and np.array_equal(np.asarray(x[k]).view(np.uint8), np.asarray(y[k]).view(np.uint8)) for k in x.arrays)
      counts["qtensors_differing"] += not same
    else:
      counts["float_leaves"] += 1
      counts["float_leaves_differing"] += not np.array_equal(np.asarray(x), np.asarray(y))
  return counts


def transformers_check(path: Path, lm, params, held: np.ndarray) -> dict:
  theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
  theirs.eval()
  worst, peak = 0.0, 0.0
  for start in (0, 2000, 4000):
    ids = held[start:start + 96]
    ours = np.asarray(lm.apply(params, jnp.asarray([ids])))
    with torch.no_grad():
      want = theirs(torch.tensor([ids.tolist()])).logits.numpy()
    worst, peak = max(worst, float(np.abs(ours - want).max())), max(peak, float(np.abs(want).max()))
  prompt = lm.tokenizer.encode("ROMEO:")
  ours_text = models.generate_tokens(lm.replace(params=params), [prompt], max_new_tokens=32)[0]
  eos = lm.config.eos_ids[0]
  with torch.no_grad():
    new = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)[0, len(prompt):].tolist()
  new = new[:new.index(eos)] if eos in new else new
  return {"max_abs_logit_diff": worst, "max_abs_logit": peak, "rel_logit_diff": worst / peak,
          "greedy_32_equal": new == ours_text, "greedy_text": lm.tokenizer.decode(ours_text)}


LLAMA_LOGITS = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, seed=0, logits_all=True)
ids = json.loads(sys.argv[2])
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[:len(ids)], np.float32).tolist()))
"""

LLAMA_GREEDY = r"""
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False, seed=0)
prompt, eos, out = json.loads(sys.argv[2]), int(sys.argv[3]), []
for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
  if tok == eos or len(out) == 32:
    break
  out.append(int(tok))
print(json.dumps(out))
"""


def llamacpp_check(python: str, path: Path, source: Path, lm, params, held_window) -> dict:
  """llama.cpp's greedy tokens on the exported file against ours, and its speed there against the source's."""
  prompt = lm.tokenizer.encode("ROMEO:")
  run = lambda *a: subprocess.run([python, *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
  theirs = json.loads(run("-c", LLAMA_GREEDY, str(path), json.dumps(prompt), str(lm.config.eos_ids[0])))
  row = {"llamacpp_greedy": lm.tokenizer.decode(theirs)}
  # llama.cpp's logits (its own Q4_1 x Q8_1 arithmetic) on 96 Tempest tokens, against ours on this file and,
  # as the scale of its arithmetic's own noise, on the released GGUF against the model loaded from it.
  for name, file, ref_params in (("exported", path, params), ("source", source, None)):
    ref = models.load(source, keep_quantized=True).params if ref_params is None else ref_params
    window = [int(t) for t in held_window]
    theirs_logits = np.asarray(json.loads(run("-c", LLAMA_LOGITS, str(file), json.dumps(window))))
    for dtype in ("float32", "int8"):
      ours_logits = np.asarray(lm.replace(config=lm.config.replace(matmul_dtype=dtype)).apply(
          ref, jnp.asarray([window])))[0]
      row[f"llamacpp_rel_logit_diff_{name}_{dtype}"] = float(np.abs(ours_logits - theirs_logits).max()
                                                             / np.abs(theirs_logits).max())
  for dtype in ("float32", "int8"):
    ours = models.generate_tokens(lm.replace(params=params, config=lm.config.replace(matmul_dtype=dtype)), [prompt],
                                  max_new_tokens=32)[0]
    row[f"llamacpp_greedy_equal_ours_{dtype}"] = list(ours) == theirs
    row[f"llamacpp_greedy_common_prefix_{dtype}"] = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
  bench = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peer_llamacpp_decode.py"
  speeds = {"exported": [], "source": []}
  for _ in range(3):
    for name, file in (("exported", path), ("source", source)):
      speeds[name].append(json.loads(run(str(bench), "64", str(file), "2").splitlines()[-1])["tokens_per_s"])
  row["llamacpp_tokens_per_s_exported"] = statistics.median(speeds["exported"])
  row["llamacpp_tokens_per_s_source"] = statistics.median(speeds["source"])
  row["llamacpp_speed_ratio"] = statistics.median(a / b for a, b in zip(speeds["exported"], speeds["source"]))
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--group-size", type=int, nargs="+", default=[32, 64])
  parser.add_argument("--llamacpp-python", help="python of an environment with llama-cpp-python")
  args = parser.parse_args()
  source = assets.fetch("smollm2-135m")
  source_bytes = source.stat().st_size
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    # SmolLM2 itself: its Q4_1 block linears as QTensors, written back.
    t0 = time.time()
    lm = models.load(source, keep_quantized=True)
    out = Path(tmp) / "smollm2.gguf"
    report = export_gguf(out, lm.config, lm.params, lm.tokenizer, source=source)
    a = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    same = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
               for n in a if n in b)
    rows.append({"setting": "SmolLM2 Q4_1 as loaded (no training)", "tensors": len(a),
                 "tensors_equal_to_source_bytes": int(same), "types": report["types"], "file_bytes": report["bytes"],
                 "source_bytes": source_bytes, "seconds": round(time.time() - t0, 1)})
    print(json.dumps(rows[-1]), flush=True)
    del lm

    for g in args.group_size:
      t0 = time.time()
      cfg = config_lib.load("configs/quickstart.py", [f"--config.steps={args.steps}",
                                                      f"--config.base.options.group_size={g}"])
      r = experiment.build(cfg, log=lambda m: None)
      state, held = loop.train_steps(r, args.steps)
      merged = r.merged(state.trainable)
      base = dict(tree_paths.flatten(r.base_params()))
      merged_offsets = [(p, qt) for p, qt in tree_paths.flatten(merged)  # the symmetric 8-bit table has none
                        if isinstance(qt, quant.QTensor) and "offset" in qt.arrays]
      moved = sum(int(np.sum(np.asarray(qt["offset"]) != np.asarray(base[p]["offset"]))) for p, qt in merged_offsets)
      groups = sum(int(np.asarray(qt["offset"]).size) for _, qt in merged_offsets)
      lm = r.lm.replace(params=merged, config=r.lm.config.replace(matmul_dtype=None))
      out = Path(tmp) / f"g{g}.gguf"
      report = export_gguf(out, lm.config, merged, lm.tokenizer, source=source)
      back = models.load(out, keep_quantized=True)
      row = {"setting": f"QA-LoRA INT4 g{g}, {args.steps} steps (quickstart config), merged",
             "offsets_moved_by_merge": f"{moved} of {groups}", **compare_params(merged, back.params),
             "types": report["types"], "max_abs_dw": report["max_abs_dw"], "file_bytes": report["bytes"],
             "source_bytes": source_bytes, "file_over_source": report["bytes"] / source_bytes}
      del back
      row.update(transformers_check(out, lm, merged, np.asarray(held)))
      if args.llamacpp_python:
        row.update(llamacpp_check(args.llamacpp_python, out, source, lm, merged, np.asarray(held)[2000:2096]))
      row["seconds"] = round(time.time() - t0, 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
      jax.clear_caches()

  result = {"machine": platform.processor() or platform.machine(), "steps": args.steps, "rows": rows,
            "command": f"python experiments/gguf_export.py --steps {args.steps} --group-size "
                       f"{' '.join(map(str, args.group_size))}"
                       + (" --llamacpp-python PY" if args.llamacpp_python else "")}
  (HERE / "gguf_export.json").write_text(json.dumps(result, indent=2) + "\n")
  (HERE / "gguf_export.md").write_text(markdown(result))


def markdown(result: dict) -> str:
  """The tables of a gguf_export.json."""
  rows = result["rows"]
  lines = ["# GGUF export of a merged QA-LoRA SmolLM2-135M", "", f"`{result['command']}`", "",
           "| setting | QTensors (the block linears, stacked over 30 layers; the 8-bit token table) bit-equal after "
           "read-back | float leaves equal | transformers max\\|dlogit\\|/max\\|logit\\| "
           "(target <= 1e-4) | greedy 32 equal | file bytes | source bytes |", "|---|---|---|---|---|---:|---:|"]
  for row in rows:
    if "qtensors" in row:
      lines.append(f"| {row['setting']} | {row['qtensors'] - row['qtensors_differing']} / {row['qtensors']} | "
                   f"{row['float_leaves'] - row['float_leaves_differing']} / {row['float_leaves']} | "
                   f"{row['rel_logit_diff']:.2e} | {row['greedy_32_equal']} | {row['file_bytes']:,} | "
                   f"{row['source_bytes']:,} |")
    else:
      lines.append(f"| {row['setting']} | tensors byte-equal to the source: {row['tensors_equal_to_source_bytes']} / "
                   f"{row['tensors']} | - | - | - | {row['file_bytes']:,} | {row['source_bytes']:,} |")
  llama = [row for row in rows if "llamacpp_greedy" in row]
  if llama:
    lines += ["", "llama.cpp (llama-cpp-python, 2 threads) on the exported files:", "",
              "| setting | greedy 32 tokens = ours (float32 / int8 matmuls; common prefix) | "
              "max\\|dlogit\\|/max\\|logit\\|, "
              "llama.cpp vs ours float32 / int8, exported file | same on the released file (llama.cpp's own noise) | "
              "llama.cpp tokens/s exported / source (ratio within rounds) |", "|---|---|---:|---:|---:|"]
    for row in llama:
      lines.append(f"| {row['setting']} | {row['llamacpp_greedy_equal_ours_float32']} / "
                   f"{row['llamacpp_greedy_equal_ours_int8']} ({row['llamacpp_greedy_common_prefix_float32']} / "
                   f"{row['llamacpp_greedy_common_prefix_int8']}) | "
                   f"{row['llamacpp_rel_logit_diff_exported_float32']:.2e} / "
                   f"{row['llamacpp_rel_logit_diff_exported_int8']:.2e} | "
                   f"{row['llamacpp_rel_logit_diff_source_float32']:.2e} / "
                   f"{row['llamacpp_rel_logit_diff_source_int8']:.2e} | "
                   f"{row['llamacpp_tokens_per_s_exported']:.1f} / "
                   f"{row['llamacpp_tokens_per_s_source']:.1f} ({row['llamacpp_speed_ratio']:.2f}) |")
  lines += ["", "The export adds the key `qalora_jax.qtensors` (each QTensor's bits, group size, symmetry; about "
            "16 KB of JSON): the whole size difference. The offsets moved by the merge are float16 values off the "
            "min-max grid; Q4_1 stores them as they are. SmolLM2's released weights are already a Q4_1 grid, so "
            "the INT4 g32 base is nearly the released model; g64 does not flatter the base.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
