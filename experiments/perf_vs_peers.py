"""Training and decoding speed and memory of qalora-jax against the PyTorch peers, measured in one session.

    python experiments/perf_vs_peers.py [--rounds 3] [--out experiments/perf]

Runs, round after round so that the machine's noise falls on both sides alike, the peers of
../shared/bench (transformers + PEFT LoRA, + bitsandbytes NF4 QLoRA; greedy decoding fp32 and QLoRA) and
`qalora bench` (train: lora, qlora, qalora, bfloat16 matmuls unless the row says fp32, with and without
remat; decode: fp32, qlora, qalora-merged, int8 activations against INT4 codes unless the row says fp32), each
in a fresh process wrapped in /usr/bin/time for its peak RSS. Prints a Markdown table of the medians over rounds with the
ratios the performance issue asks for, and writes it with the raw JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from qalora_jax import assets
from qalora_jax.files import write_bytes

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def measure(cmd: list[str]) -> dict:
  """The command's JSON line, with its peak RSS (MB) from /usr/bin/time."""
  env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "2")}
  proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
  rss = [ln for ln in proc.stderr.splitlines() if ln.startswith("maxrss_kb")][-1]
  return {**json.loads(line), "maxrss_mb": int(rss.split()[1]) / 1024}


def commands(gguf_dir: str, bench_dir: Path) -> dict[str, list[str]]:
  py, qalora = sys.executable, [sys.executable, "-m", "qalora_jax.cli", "bench"]
  return {
      "peer train lora": [py, str(bench_dir / "peer_train_step.py"), "lora", "4", "128", gguf_dir],
      "peer train qlora": [py, str(bench_dir / "peer_train_step.py"), "qlora", "4", "128", gguf_dir],
      "ours train lora": qalora + ["train", "--method", "lora"],
      "ours train qlora": qalora + ["train", "--method", "qlora"],
      "ours train qalora": qalora + ["train", "--method", "qalora"],
      "ours train qalora remat": qalora + ["train", "--method", "qalora", "--remat"],
      "ours train qalora fp32 matmuls": qalora + ["train", "--method", "qalora", "--matmul-dtype", "float32"],
      "ours train qalora fp32 matmuls remat": qalora + ["train", "--method", "qalora", "--matmul-dtype", "float32",
                                                        "--remat"],
      "peer decode fp32": [py, str(bench_dir / "peer_decode.py"), "fp32", "64", gguf_dir],
      "peer decode qlora": [py, str(bench_dir / "peer_decode.py"), "qlora", "64", gguf_dir],
      "ours decode fp32": qalora + ["decode", "--method", "fp32"],
      "ours decode qlora": qalora + ["decode", "--method", "qlora"],
      "ours decode qalora-merged": qalora + ["decode", "--method", "qalora-merged"],
      "ours decode qalora-merged fp32 matmuls": qalora + ["decode", "--method", "qalora-merged", "--matmul-dtype",
                                                          "float32"],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--bench-dir", default=str(BENCH), help="the peers' scripts (shared/bench)")
  parser.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
  parser.add_argument("--out", default="experiments/perf")
  args = parser.parse_args()
  gguf_dir = str(assets.fetch("smollm2-135m").parent)
  cmds = commands(gguf_dir, Path(args.bench_dir))
  if args.only:
    cmds = {k: v for k, v in cmds.items() if k in args.only}
  runs: dict[str, list[dict]] = {k: [] for k in cmds}
  for r in range(args.rounds):
    for name, cmd in cmds.items():
      runs[name].append(measure(cmd))
      print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s, "
            f"{runs[name][-1]['maxrss_mb']:.0f} MB", file=sys.stderr, flush=True)
  med = {k: {f: statistics.median(x[f] for x in v) for f in ("tokens_per_s", "maxrss_mb")} for k, v in runs.items()}
  for k, v in runs.items():
    if "compile_s" in v[0]:
      med[k]["compile_s"] = statistics.median(x["compile_s"] for x in v)
    for field in ("mfu", "read_gb_s", "bandwidth_gb_s", "bytes_per_token"):
      if field in v[0]:
        med[k][field] = statistics.median(x[field] for x in v)

  def ratio(a, b, field="tokens_per_s"):
    return f"{med[a][field] / med[b][field]:.2f}x" if a in med and b in med else "-"

  lines = [f"Medians of {args.rounds} rounds, SmolLM2-135M, batch 4 x 128 (train) / batch 1, 32 + 64 tokens "
           f"(decode), r = 16 on all seven linears, this machine.", "",
           "| run | tokens/s | peak RSS MB | compile s | MFU | weights read / token MB | read GB/s (bandwidth) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for k, m in med.items():
    read = (f"{m['bytes_per_token'] / 1e6:.0f} | {m['read_gb_s']:.1f} ({m['bandwidth_gb_s']:.1f})"
            if "read_gb_s" in m else "- | -")
    compile_s = f"{m['compile_s']:.1f}" if "compile_s" in m else "-"
    mfu = f"{m['mfu']:.3f}" if "mfu" in m else "-"
    lines.append(f"| {k} | {m['tokens_per_s']:.1f} | {m['maxrss_mb']:.0f} | {compile_s} | {mfu} | {read} |")
  lines += ["", "| target | measured | goal |", "|---|---:|---:|",
            f"| QA-LoRA train (remat) / peer QLoRA, tokens/s | "
            f"{ratio('ours train qalora remat', 'peer train qlora')} | >= 1.5x |",
            f"| QA-LoRA train (remat) / peer LoRA, tokens/s | "
            f"{ratio('ours train qalora remat', 'peer train lora')} | >= 1.2x |",
            f"| QA-LoRA train (remat) peak RSS / peer QLoRA | "
            f"{ratio('ours train qalora remat', 'peer train qlora', 'maxrss_mb')} | <= 0.6x |",
            f"| QA-LoRA train (no remat) / peer QLoRA, tokens/s | "
            f"{ratio('ours train qalora', 'peer train qlora')} | (>= 1.5x) |",
            f"| QA-LoRA train (no remat) peak RSS / peer QLoRA | "
            f"{ratio('ours train qalora', 'peer train qlora', 'maxrss_mb')} | (<= 0.6x) |",
            f"| QA-LoRA train, fp32 matmuls / peer QLoRA | "
            f"{ratio('ours train qalora fp32 matmuls', 'peer train qlora')} | (>= 1.5x) |",
            f"| QA-LoRA train, fp32 matmuls / peer LoRA | "
            f"{ratio('ours train qalora fp32 matmuls', 'peer train lora')} | (>= 1.2x) |",
            f"| QA-LoRA train, fp32 matmuls, remat, peak RSS / peer QLoRA | "
            f"{ratio('ours train qalora fp32 matmuls remat', 'peer train qlora', 'maxrss_mb')} | (<= 0.6x) |",
            f"| our QLoRA train / peer QLoRA | {ratio('ours train qlora', 'peer train qlora')} | >= 1.2x |",
            f"| merged QA-LoRA decode / peer QLoRA decode | "
            f"{ratio('ours decode qalora-merged', 'peer decode qlora')} | >= 3x |",
            f"| merged QA-LoRA decode / our fp32 decode | "
            f"{ratio('ours decode qalora-merged', 'ours decode fp32')} | >= 2x |"]
  text = "\n".join(lines) + "\n"
  print(text)
  out = Path(args.out)
  write_bytes(out / "perf_vs_peers.md", text.encode())
  write_bytes(out / "perf_vs_peers.jsonl", "".join(json.dumps({"run": k, **x}) + "\n"
                                                       for k, v in runs.items() for x in v).encode())


if __name__ == "__main__":
  main()
