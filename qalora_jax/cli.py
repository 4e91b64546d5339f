"""The `qalora` command line: `qalora --help` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import sys


def _fetch(args) -> int:
  from qalora_jax import assets

  for name in args.names:
    print(assets.fetch(name, log=lambda m: print(m, file=sys.stderr)))
  return 0


def _quantize_report(args) -> int:
  from qalora_jax import assets
  from qalora_jax.eval import quant_report
  from qalora_jax.models import gguf

  setting_list = quant_report.settings(args.quantizer, args.bits, args.group_size,
                                       double_quant=args.double_quant or None)
  for name, options in setting_list:  # validate every setting before the slow part
    from qalora_jax import quant
    quant.get(name, **options)
  path = args.model
  if path in assets.ASSETS:
    path = assets.fetch(path, log=lambda m: print(m, file=sys.stderr))
  kernels = list(gguf.linear_kernels(path))
  if not kernels:
    raise ValueError(f"--model {args.model}: no LLaMA block linear weights found")
  rows = quant_report.quantization_report(kernels, setting_list, progress=not args.json)
  if args.json:
    for row in rows:
      print(json.dumps(row.to_json()))
  else:
    n = sum(k.size for _, k in kernels)
    print(f"{len(kernels)} linear layers, {n:,} weights ({4 * n:,} bytes as float32)")
    print(quant_report.format_table(rows))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="qalora", description="Fine-tune quantized language models with LoRA, QLoRA and QA-LoRA in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser("fetch", help="download, verify and cache a model or corpus; print its path",
                     description="Download a pinned asset, verify its sha256, cache it, print its path.")
  p.add_argument("names", nargs="+", metavar="NAME", help="smollm2-135m | shakespeare")
  p.set_defaults(run=_fetch)

  p = sub.add_parser("quantize-report", help="bits per weight and reconstruction error of quantizers on a model",
                     description="Quantize every linear weight of a model's blocks under each requested "
                                 "setting; print bits per weight, bytes and mean relative squared error.")
  p.add_argument("--model", default="smollm2-135m", help="asset name or GGUF path (default: smollm2-135m)")
  p.add_argument("--quantizer", nargs="+", default=["int"], help="registered quantizer name(s)")
  p.add_argument("--bits", nargs="+", type=int, help="bit widths (quantizers with a `bits` option)")
  p.add_argument("--group-size", nargs="+", type=int,
                 help="group sizes along the input dim (-1: per channel); block size for nf4/fp4")
  p.add_argument("--double-quant", action="store_true", help="double-quantize absmax (nf4/fp4)")
  p.add_argument("--json", action="store_true", help="one JSON object per setting instead of a table")
  p.set_defaults(run=_quantize_report)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.run(args)
  except (ValueError, TypeError, RuntimeError, FileNotFoundError) as e:
    print(f"qalora {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
