"""GPTQ vs round to nearest (`int`) on SmolLM2-135M with Shakespeare calibration.

    python experiments/gptq_report.py                       # 128 segments x 512 tokens, 4/g128, 3/g128, 2/g64
    python experiments/gptq_report.py --segments 16 --settings 4:128

For each setting both quantizers run through the same block-by-block driver (qalora_jax.calibration), so
each layer's output error ||X W - X W~||^2 / ||X W||^2 is measured on the inputs it sees in that quantized
model; the table gives its mean over the 210 linear layers, the ratio GPTQ / RTN, the perplexity on the
held-out The Tempest (first 8192 tokens, 512-token windows) and the time to quantize. Rows are printed as
Markdown and appended as JSON lines to --out.
"""

from __future__ import annotations

import os

# Before numpy / jax load OpenBLAS: its worker threads (LAPACK behind JAX's CPU Cholesky) spin-wait when the
# CPU is shared; measured here next to another busy process, a 576-wide damped inverse Cholesky took 0.5-1 s
# with the default threads and 10 ms with one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from qalora_jax import calibration, models  # noqa: E402
from qalora_jax.eval import quant_report  # noqa: E402


def ratio(a: float, b: float) -> str:
  """a / b, or "-" when b is 0 (RTN at 4-bit g32 reproduces SmolLM2's own Q4_1 grid exactly: no error at all)."""
  return f"{a / b:.3f}" if b else "-"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="smollm2-135m")
  parser.add_argument("--segments", type=int, default=128)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--settings", default="4:128,3:128,2:64", help="bits:group_size pairs, comma-separated")
  parser.add_argument("--eval-tokens", type=int, default=8192)
  parser.add_argument("--out", help="append one JSON line per row to this file")
  args = parser.parse_args(argv)

  lm = models.load(args.model)
  tokens = calibration.calibration_tokens(lm, args.segments, args.seq_len, args.seed)
  held = calibration.heldout_tokens(lm, args.eval_tokens)
  start = time.perf_counter()
  base_ppl = models.perplexity(lm, held, window=512)
  print(f"float32 perplexity {base_ppl:.3f} ({time.perf_counter() - start:.0f} s); calibration "
        f"{args.segments} x {args.seq_len} tokens", file=sys.stderr)
  lines = ["| bits | group | RTN output err | GPTQ output err | GPTQ / RTN | RTN ppl | GPTQ ppl | GPTQ s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for item in args.settings.split(","):
    bits, group = (int(v) for v in item.split(":"))
    setting_list = [("int", dict(bits=bits, group_size=group)), ("gptq", dict(bits=bits, group_size=group))]
    rtn, ours = quant_report.calibrated_report(lm, setting_list, tokens, held)
    lines.append(f"| {bits} | {group} | {rtn.output_rel_error:.4e} | {ours.output_rel_error:.4e} | "
                 f"{ratio(ours.output_rel_error, rtn.output_rel_error)} | {rtn.ppl:.2f} | {ours.ppl:.2f} | "
                 f"{ours.seconds:.0f} |")
    print(lines[-1], file=sys.stderr)
    if args.out:
      with open(args.out, "a") as f:
        for row in (rtn, ours):
          f.write(json.dumps({**row.to_json(), "segments": args.segments, "seq_len": args.seq_len,
                              "float_ppl": base_ppl}) + "\n")
  print(f"float32 perplexity: {base_ppl:.2f}")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
