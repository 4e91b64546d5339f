"""Training and decoding speed and memory of qalora-jax against the peers a user would pick instead, at equal
precision, measured round after round in one session.

    python experiments/perf_vs_peers.py [--rounds 3] [--groups train seq bits decode quality] [--out experiments/perf]
        [--qwix-python qwix-venv/bin/python] [--llamacpp-python llama-venv/bin/python] [--readme]

The peers are ../shared/bench's (see its README for their virtual environments): transformers + PEFT LoRA and
+ bitsandbytes NF4 QLoRA in the recipe users run (bf16: autocast, bnb compute_dtype=bfloat16; and fp32), qwix
QLoRA on tunix's NNX LLaMA, llama.cpp decoding the released GGUF. Ours is `qalora bench` at the precision of
the peer it is compared with: bfloat16 weight matmuls against the bf16 rows, float32 matmuls against the fp32
rows. The quality group measures what the decoding path's int8 activations cost: `qalora eval`'s perplexity of
the first 4,096 Tempest tokens with float32 matmuls and with the int8 path. Each run is a fresh process under
/usr/bin/time (peak RSS). A ratio is taken within each round (both
runs measured minutes apart, on the same machine state) and the table gives the median of those ratios with
their range, never a ratio of medians. Every JSON line records the CPU (model, cores, AVX512/VNNI/BF16/AMX
flags): this machine changes between sessions. A peer whose environment is missing is skipped, and its
targets say so.

Writes perf_vs_peers.md (the tables) and perf_vs_peers.jsonl (every run) to --out; --readme refills README.md's
block generated from that perf_vs_peers.md (qalora_jax.readme; tests/test_readme_figures.py checks that the
block, the .md file and the .jsonl file agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from qalora_jax import assets, hardware, readme
from qalora_jax.files import write_bytes

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
README = ROOT / "README.md"


@dataclasses.dataclass(frozen=True)
class Target:
  label: str
  num: str            # run whose figure is divided
  den: str            # by this run's, within a round
  field: str          # tokens_per_s, maxrss_mb, ppl, or tokens_per_s_at_peak (see `figure`)
  goal: str           # ">= 1.5" or "<= 0.55"; "" for a figure that bounds another
  den_field: str = ""  # the den run's field, if not `field`

  def met(self, value: float) -> bool:
    op, bound = self.goal.split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def figure(line: dict, field: str) -> float:
  """A run's figure: a field of its JSON line, or tokens_per_s_at_peak, the tokens/s of its model FLOPs at the
  matmul peak measured in the same process (tokens_per_s / mfu), a bound no step of that model can pass."""
  return line["tokens_per_s"] / line["mfu"] if field == "tokens_per_s_at_peak" else line[field]


def runs(gguf_dir: str, bench: Path, qwix_py: str | None, llama_py: str | None) -> dict[str, dict[str, list[str]]]:
  """{group: {run name: command}}; a peer without its environment is left out."""
  py, ours = sys.executable, [sys.executable, "-m", "qalora_jax.cli", "bench"]
  peer = lambda *a: [py, str(bench / "peer_train_step.py"), *a, gguf_dir]  # noqa: E731
  train = {
      "peer qlora bf16": peer("qlora", "4", "128") + ["bf16"],
      "peer lora bf16": peer("lora", "4", "128") + ["bf16"],
      "peer qlora fp32": peer("qlora", "4", "128") + ["fp32"],
      "ours qalora": ours + ["train", "--method", "qalora"],
      "ours qalora remat": ours + ["train", "--method", "qalora", "--remat"],
      "ours qlora": ours + ["train", "--method", "qlora"],
      "ours qalora fp32": ours + ["train", "--method", "qalora", "--matmul-dtype", "float32"],
  }
  if qwix_py:
    train["qwix qlora-nf4 bf16"] = [qwix_py, str(bench / "peer_qwix_train_step.py"), "qlora-nf4", "4", "128",
                                    gguf_dir, "bf16"]
  seq = {}
  for t in ("512", "2048"):
    seq[f"peer qlora bf16 1x{t}"] = [py, str(bench / "peer_train_step.py"), "qlora", "1", t, gguf_dir, "bf16"]
    seq[f"ours qalora remat 1x{t}"] = ours + ["train", "--method", "qalora", "--remat", "--batch", "1", "--seq", t]
  seq["ours qalora remat 4x128"] = ours + ["train", "--method", "qalora", "--remat"]
  # remat keeping attention's q, k, v and the MLP's gate and up: speed for memory, within the 1 x 2048 RSS bound
  seq["ours qalora remat-keep 1x2048"] = ours + ["train", "--method", "qalora", "--remat", "--remat-keep", "qkv,mlp",
                                                 "--batch", "1", "--seq", "2048"]
  bits = {f"ours qalora {b}-bit g{g}": ours + ["train", "--method", "qalora", "--bits", str(b), "--group-size", str(g)]
          for g in (32, 128) for b in (4, 3, 2)}
  decode = {
      "ours decode qalora-merged": ours + ["decode", "--method", "qalora-merged", "--embedding", "int8"],
      "ours decode qalora-merged, float32 table": ours + ["decode", "--method", "qalora-merged"],
      "peer decode qlora-bf16": [py, str(bench / "peer_decode.py"), "qlora-bf16", "64", gguf_dir],
  }
  if llama_py:
    # as released, or without its repacked weight layouts where those crash (experiments/llamacpp_decode.py)
    decode["llama.cpp decode"] = [llama_py, str(ROOT / "experiments" / "llamacpp_decode.py"),
                                  str(bench / "peer_llamacpp_decode.py"), "64",
                                  str(Path(gguf_dir) / "SmolLM2-135M-Instruct.Q4_1.gguf"), str(os.cpu_count())]
  cli = [sys.executable, "-m", "qalora_jax.cli", "eval", "--model", "smollm2-135m", "--tokens", "4096"]
  quality = {"ours perplexity float32 matmuls": cli,
             "ours perplexity int8 path": cli + ["--matmul-dtype", "int8", "--embedding", "int8"]}
  return {"train": train, "seq": seq, "bits": bits, "decode": decode, "quality": quality}


TARGETS = [
    Target("QA-LoRA (bf16 matmuls) / PEFT + bnb QLoRA bf16, tokens/s", "ours qalora", "peer qlora bf16",
           "tokens_per_s", ">= 1.5"),
    Target("QA-LoRA (bf16 matmuls) / PEFT LoRA bf16 autocast, tokens/s", "ours qalora", "peer lora bf16",
           "tokens_per_s", ">= 1.5"),
    Target("QA-LoRA (bf16 matmuls) / qwix QLoRA nf4 bf16, tokens/s", "ours qalora", "qwix qlora-nf4 bf16",
           "tokens_per_s", ">= 2"),
    Target("our QLoRA / PEFT + bnb QLoRA bf16, tokens/s", "ours qlora", "peer qlora bf16", "tokens_per_s", ">= 1.3"),
    Target("QA-LoRA all float32 / PEFT + bnb QLoRA fp32, tokens/s", "ours qalora fp32", "peer qlora fp32",
           "tokens_per_s", ">= 1.5"),
    Target("bound: QA-LoRA all float32 at 100% of its measured matmul peak / PEFT + bnb QLoRA fp32, tokens/s",
           "ours qalora fp32", "peer qlora fp32", "tokens_per_s_at_peak", "", "tokens_per_s"),
    Target("QA-LoRA remat peak RSS / PEFT + bnb QLoRA bf16", "ours qalora remat", "peer qlora bf16", "maxrss_mb",
           "<= 0.55"),
    Target("1 x 512: QA-LoRA remat / PEFT + bnb QLoRA bf16, tokens/s", "ours qalora remat 1x512",
           "peer qlora bf16 1x512", "tokens_per_s", ">= 1.5"),
    Target("1 x 2048: QA-LoRA remat / PEFT + bnb QLoRA bf16, tokens/s", "ours qalora remat 1x2048",
           "peer qlora bf16 1x2048", "tokens_per_s", ">= 1.5"),
    Target("1 x 2048: QA-LoRA remat / PEFT + bnb QLoRA bf16, peak RSS", "ours qalora remat 1x2048",
           "peer qlora bf16 1x2048", "maxrss_mb", "<= 0.5"),
    Target("1 x 2048: QA-LoRA remat keeping q, k, v, gate, up / PEFT + bnb QLoRA bf16, tokens/s",
           "ours qalora remat-keep 1x2048", "peer qlora bf16 1x2048", "tokens_per_s", ">= 1.5"),
    Target("1 x 2048: QA-LoRA remat keeping q, k, v, gate, up / PEFT + bnb QLoRA bf16, peak RSS",
           "ours qalora remat-keep 1x2048", "peer qlora bf16 1x2048", "maxrss_mb", "<= 0.5"),
    Target("ours at 1 x 2048 / ours at 4 x 128, tokens/s", "ours qalora remat 1x2048", "ours qalora remat 4x128",
           "tokens_per_s", ">= 0.75"),
    *[Target(f"QA-LoRA {b}-bit / 4-bit, g{g}, tokens/s", f"ours qalora {b}-bit g{g}", f"ours qalora 4-bit g{g}",
             "tokens_per_s", ">= 0.85") for g in (32, 128) for b in (3, 2)],
    Target("merged INT4 g32 decoding, 8-bit table / llama.cpp on the released Q4_1 + Q8_0 GGUF, same threads, "
           "tokens/s", "ours decode qalora-merged",
           "llama.cpp decode", "tokens_per_s", ">= 1.2"),
    Target("merged INT4 decoding / PEFT + bnb QLoRA bf16 decoding, tokens/s", "ours decode qalora-merged",
           "peer decode qlora-bf16", "tokens_per_s", ">= 3"),
    Target("int8 decoding path's perplexity / float32 matmuls' (SmolLM2's Q4_1 GGUF, 4,096 Tempest tokens)",
           "ours perplexity int8 path", "ours perplexity float32 matmuls", "ppl", "<= 1.01"),
]


def measure(cmd: list[str]) -> dict:
  """The command's JSON line, with its peak RSS (MB) from /usr/bin/time and the machine."""
  env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", str(os.cpu_count()))}
  proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", *cmd], capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
  rss = [ln for ln in proc.stderr.splitlines() if ln.startswith("maxrss_kb")][-1]
  return {**json.loads(line), "maxrss_mb": int(rss.split()[1]) / 1024, "cpu": hardware.cpu()}


def within_round_ratios(lines: list[dict], target: Target) -> list[float]:
  """target.num / target.den of each round in which both ran."""
  by_round = {}
  for x in lines:
    by_round.setdefault(x["round"], {})[x["run"]] = x
  return [figure(r[target.num], target.field) / figure(r[target.den], target.den_field or target.field)
          for _, r in sorted(by_round.items()) if target.num in r and target.den in r]


def tables(lines: list[dict]) -> str:
  """The Markdown of a set of runs: medians per run, then each target's median within-round ratio."""
  rounds = len({x["round"] for x in lines})
  names = list(dict.fromkeys(x["run"] for x in lines))
  machine = lines[0]["cpu"]
  out = [f"SmolLM2-135M, r = 16 on all seven linears; training batch 4 x 128 unless the run says otherwise, "
         f"decoding batch 1 (32-token prompt, 64 new tokens). {rounds} rounds, medians; ratios are the median "
         f"of the ratios within each round [range]. CPU: {machine['model']}, {machine['cores']} cores, "
         f"{' '.join(machine['flags'])}.", "",
         "| run | tokens/s | peak RSS MB | MFU | weights read / token MB | perplexity |",
         "|---|---:|---:|---:|---:|---:|"]
  for name in names:
    xs = [x for x in lines if x["run"] == name]
    med = lambda f, fmt, scale=1: (f"{statistics.median(x[f] for x in xs) / scale:{fmt}}"  # noqa: E731
                                   if f in xs[0] else "-")
    out.append(f"| {name} | {med('tokens_per_s', '.1f')} | {med('maxrss_mb', '.0f')} | {med('mfu', '.2f')} | "
               f"{med('bytes_per_token', '.0f', 1e6)} | {med('ppl', '.3f')} |")
  out += ["", "| target | measured | goal | met |", "|---|---:|---:|:---:|"]
  for t in TARGETS:
    ratios = within_round_ratios(lines, t)
    if not ratios:
      continue
    m = statistics.median(ratios)
    spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
    goal, met = (f"{t.goal}x", "yes" if t.met(m) else "no") if t.goal else ("-", "-")
    out.append(f"| {t.label} | {m:.{3 if t.field == 'ppl' else 2}f}x{spread} | {goal} | {met} |")
  missing = [t.label for t in TARGETS if not within_round_ratios(lines, t)]
  if missing:
    out += ["", "Not measured in this run: " + "; ".join(missing) + "."]
  unpacked = [x for x in lines if x.get("extra_buffer_types") is False]
  if unpacked:
    out += ["", f"llama.cpp ran without its extra weight buffer types (repacked and AMX layouts) in "
            f"{len(unpacked)} of {rounds} rounds: as released it died of signal {unpacked[0]['released_signal']} "
            "(experiments/llamacpp_decode.py)."]
  return "\n".join(out) + "\n"


def rewrite(jsonl: Path) -> str:
  """The tables of a committed perf_vs_peers.jsonl (its failed runs left out), e.g. after a label changed."""
  lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
  return tables([x for x in lines if "error" not in x])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--groups", nargs="*", default=["train", "seq", "bits", "decode", "quality"])
  parser.add_argument("--only", nargs="*", help="run only these runs (names as in the table)")
  parser.add_argument("--bench-dir", default=str(BENCH), help="the peers' scripts (shared/bench)")
  parser.add_argument("--qwix-python", help="python of the qwix + tunix environment (shared/bench/README.md)")
  parser.add_argument("--llamacpp-python", help="python of an environment with llama-cpp-python")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "perf"))
  parser.add_argument("--readme", action="store_true",
                      help="refill README.md's block generated from --out's perf_vs_peers.md")
  args = parser.parse_args()
  gguf_dir = str(assets.fetch("smollm2-135m").parent)
  groups = runs(gguf_dir, Path(args.bench_dir), args.qwix_python, args.llamacpp_python)
  cmds = {name: cmd for g in args.groups for name, cmd in groups[g].items()
          if not args.only or name in args.only}
  lines, failed = [], []
  for r in range(args.rounds):
    for name, cmd in cmds.items():
      try:
        lines.append({"run": name, "round": r, **measure(cmd)})
      except RuntimeError as e:  # one run failing does not lose the others; it is reported below the tables
        failed.append({"run": name, "round": r, "error": str(e)[-500:]})
        print(f"round {r + 1}/{args.rounds} {name}: failed: {str(e)[-300:]}", file=sys.stderr, flush=True)
        continue
      x = lines[-1]
      what = f"perplexity {x['ppl']:.3f}" if "ppl" in x else f"{x['tokens_per_s']:.1f} tokens/s"
      print(f"round {r + 1}/{args.rounds} {name}: {what}, {x['maxrss_mb']:.0f} MB", file=sys.stderr, flush=True)
  text = tables(lines)
  if failed:
    text += "\nFailed runs: " + "; ".join(f"{f['run']} (round {f['round'] + 1})" for f in failed) + ".\n"
  print(text)
  out = Path(args.out)
  write_bytes(out / "perf_vs_peers.md", text.encode())
  write_bytes(out / "perf_vs_peers.jsonl", "".join(json.dumps(x) + "\n" for x in lines + failed).encode())
  if args.readme:
    readme.fill(README, under=out)


if __name__ == "__main__":
  main()
