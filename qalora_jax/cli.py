"""The `qalora` command line: `qalora --help` lists the subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from qalora_jax import hardware


def _fetch(args) -> int:
  from qalora_jax import assets

  for name in args.names:
    print(assets.fetch(name, log=lambda m: print(m, file=sys.stderr)))
  return 0


def _quantize_report(args) -> int:
  # Before numpy / jax load OpenBLAS: its threads (LAPACK behind GPTQ's Cholesky) spin-wait on a shared CPU.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  from qalora_jax import assets, quant
  from qalora_jax.eval import quant_report

  quant.import_modules(args.imports, where="--import")
  setting_list = quant_report.settings(args.quantizer, args.bits, args.group_size,
                                       double_quant=args.double_quant or None)
  for name, options in setting_list:  # validate every setting before the slow part
    quant.get(name, **options)
  if args.calibration is not None and args.calibration < 1:
    raise ValueError(f"--calibration {args.calibration} is not supported; allowed: a positive number of segments")
  path = args.model
  if path in assets.ASSETS:
    path = assets.fetch(path, log=lambda m: print(m, file=sys.stderr))
  if "gptq" in args.quantizer and not args.calibration:
    print("note: gptq without --calibration uses H = I, i.e. round to nearest on GPTQ's grid", file=sys.stderr)
  header, rows = quant_report.report(path, setting_list, calibration=args.calibration,
                                     calibration_len=args.calibration_len, seed=args.seed,
                                     eval_tokens=args.eval_tokens, progress=not args.json)
  if args.json:
    for row in rows:
      print(json.dumps(row.to_json()))
  else:
    print(header)
    print(quant_report.format_table(rows))
  return 0


def _train(args) -> int:
  from qalora_jax.train import config as config_lib
  from qalora_jax.train import loop

  cfg = config_lib.load(args.config, args.overrides)
  result = loop.run(cfg, args.workdir, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
  print(json.dumps({k: v for k, v in result.items() if k != "config"}))
  return 0


def _sweep(args) -> int:
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GPTQ bases: as in _quantize_report
  from qalora_jax.train import sweep

  shard = sweep.parse_shard(args.shard)
  s = sweep.load(args.config)
  if args.dry_run:
    for i, cell in enumerate(s.cells):
      mark = "*" if i % shard[1] == shard[0] else " "
      print(f"{mark} {i:3d} cells/{cell.dirname}: {json.dumps(cell.overrides)}")
    return 0
  outcome = sweep.run(s, args.workdir, shard, log=lambda m: print(m, file=sys.stderr))
  print(json.dumps({k: len(v) for k, v in outcome.items()}))
  return 1 if outcome["failed"] else 0


def _table(args) -> int:
  from pathlib import Path

  from qalora_jax.eval import tables

  if args.readme and not Path(args.readme).is_file():
    raise ValueError(f"--readme {args.readme}: no such file; allowed: a Markdown file with a block "
                     f"'<!-- generated from PATH by COMMAND -->' naming a file the table writes")
  spec = None
  if args.rows or args.columns or args.value:
    spec = {"rows": (args.rows or "name").split(",")}
    if args.columns:
      spec["columns"] = args.columns
    if args.value:
      spec["value"] = args.value.split(",")
    spec = [spec]
  print(tables.write(args.workdir, spec, None if not spec else [], args.out))
  if args.readme:
    from qalora_jax import readme

    readme.fill(args.readme, under=args.out or args.workdir)
  return 0


def _bench(args) -> int:
  from qalora_jax import bench

  if args.what == "train":
    result = bench.bench_train(args.method or "qalora", args.batch, args.seq, args.model, args.dtype, args.remat,
                               repeats=args.repeats, matmul_dtype=args.matmul_dtype or "bfloat16", bits=args.bits,
                               group_size=args.group_size, remat_keep=args.remat_keep)
  elif args.what == "decode":
    result = bench.bench_decode(args.method or "qalora-merged", args.new_tokens, args.prompt, args.model,
                                repeats=args.repeats, matmul_dtype=args.matmul_dtype or "int8",
                                embedding=args.embedding)
  else:
    result = {"bench": "peaks", "matmul_peak_gflop_s": bench.matmul_peak_flops() / 1e9,
              "bandwidth_gb_s": bench.read_bandwidth() / 1e9, **bench.machine()}
  print(json.dumps(result))
  return 0


def _model(args):
  """(lm, params, info) of --model or --workdir (its adapters merged with --merged), as --matmul-dtype and
  --embedding ask, both checked before anything is loaded: "int8" multiplies INT4/INT8 QTensors with int8
  activations in the CPU kernel (a GGUF --model then keeps its Q4/Q8 blocks as QTensors, the weights llama.cpp
  reads); --embedding int8 stores a float token table (and tied head) in 8-bit rows. info: a saved model's
  (models.saved_info), or the run's step and config."""
  from qalora_jax import models
  from qalora_jax.train import experiment

  allowed = ("float32", "bfloat16", "int8")
  if args.matmul_dtype not in (None, *allowed):
    raise ValueError(f"--matmul-dtype {args.matmul_dtype!r} is not supported; allowed: {', '.join(allowed)}")
  if args.embedding not in ("float", "int8"):
    raise ValueError(f"--embedding {args.embedding!r} is not supported; allowed: float, int8")
  if args.workdir:
    exp, trainable, step = experiment.restore(args.workdir, log=lambda m: print(m, file=sys.stderr))
    lm, params = exp.lm, (exp.merged(trainable) if args.merged else exp.params(trainable))
    info = {"step": step, "run_config": experiment.run_config(args.workdir)}
  else:
    lm = models.load(args.model, keep_quantized=args.matmul_dtype == "int8")
    params, info = lm.params, models.saved_info(args.model) or {}
  if args.embedding == "int8":
    params = models.quantize.int8_table(params)
  if args.matmul_dtype == "int8":
    from qalora_jax.kernels import cpu_matmul

    params = cpu_matmul.prepare(params)  # laid out for the kernel once, not in every call of the model
  if args.matmul_dtype is not None:
    lm = lm.replace(config=lm.config.replace(matmul_dtype=args.matmul_dtype))
  return lm, params, info


def _eval(args) -> int:
  from qalora_jax.train import experiment

  lm, params, info = _model(args)
  step, merged = info.get("step"), args.merged if args.workdir else "step" in info  # a merged directory is merged
  if args.mc:
    from qalora_jax.eval import multiple_choice

    result = multiple_choice.evaluate(multiple_choice.model_logits_fn(lm, params), lm.tokenizer.encode,
                                      args.mc, k_shot=args.shots, max_len=lm.config.max_seq_len)
    print(json.dumps({**result, "step": step, "merged": merged}))
    return 0
  if args.data:
    text = open(args.data, encoding="utf-8").read()
    if not text.strip():
      raise ValueError(f"--data {args.data}: the file is empty")
    ids = lm.tokenizer.encode(text)
  else:  # the run's held-out plays (a merged directory's run too), else The Tempest's first 8192 tokens
    ids = experiment.heldout_ids(lm, info.get("run_config"))
  if args.tokens:
    ids = ids[:args.tokens]
  window = min(args.window, lm.config.max_seq_len, len(ids))
  ppl = experiment.evaluate_ppl(lm, params, ids, window, matmul_dtype=args.matmul_dtype)
  n = (len(ids) // window) * (window - 1)
  print(json.dumps({"ppl": ppl, "tokens": n, "step": step, "merged": merged, "matmul_dtype": args.matmul_dtype,
                    "embedding": args.embedding}))
  return 0


def _merge(args) -> int:
  """Writes the merged model as a saved model directory (models.save): a model like any other for
  `generate --model`, `eval --model`, `export --model` and models.load."""
  from qalora_jax import models, nn
  from qalora_jax.train import experiment

  lm, info = experiment.merged_model(args.workdir, args.requantize, log=lambda m: print(m, file=sys.stderr))
  models.save(lm, args.out, info=info, overwrite=args.overwrite)
  print(json.dumps({"out": str(args.out), "bytes": nn.tree_nbytes(lm.params), "step": info["step"]}))
  return 0


def _generate(args) -> int:
  from qalora_jax import models

  lm, params, _ = _model(args)
  for prompt in args.prompt:
    text = models.generate(lm, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, params=params)[0]
    print(text)
  return 0


def _matmul_options(p, default) -> None:
  p.add_argument("--matmul-dtype", default=default,
                 help="weight matmuls: float32 | bfloat16 | int8 (int8 activations against INT4/INT8 QTensors in "
                      "the CPU kernel, as llama.cpp; a GGUF --model then keeps its Q4/Q8 blocks as QTensors)")
  p.add_argument("--embedding", default="float", help="float | int8: the token table (and tied head) in 8-bit rows")


def _export(args) -> int:
  from qalora_jax.export import merged

  log = lambda m: print(m, file=sys.stderr)
  if args.format == "peft":
    report = merged.to_peft(args.out, args.workdir, overwrite=args.overwrite, log=log)
  elif args.format == "gguf":
    report = merged.to_gguf(args.out, args.workdir, args.model, requantize=args.requantize, merged=args.merged,
                            float_type=args.float_type, allow_rounding=args.allow_rounding,
                            overwrite=args.overwrite, log=log)
  else:
    report = merged.to_gptq(args.out, args.workdir, args.model, requantize=args.requantize, merged=args.merged,
                            zeros=args.zeros, overwrite=args.overwrite, log=log)
  print(json.dumps(report))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="qalora", description="Fine-tune quantized language models with LoRA, QLoRA and QA-LoRA in JAX.")
  parser.add_argument("--distributed", action="store_true",
                      help="multi-host: call jax.distributed.initialize() first (every process runs the same command)")
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
  p.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                 help="module names or .py files to import first (quantizers registered outside qalora_jax.quant)")
  p.add_argument("--bits", nargs="+", type=int, help="bit widths (quantizers with a `bits` option)")
  p.add_argument("--group-size", nargs="+", type=int,
                 help="group sizes along the input dim (-1: per channel); block size for nf4/fp4")
  p.add_argument("--double-quant", action="store_true", help="double-quantize absmax (nf4/fp4)")
  p.add_argument("--json", action="store_true", help="one JSON object per setting instead of a table")
  p.add_argument("--calibration", type=int, metavar="N",
                 help="quantize block by block on N calibration segments of the training plays (needed by gptq); "
                      "adds output_rel_error ||XW - XW~||^2/||XW||^2 and held-out perplexity ppl")
  p.add_argument("--calibration-len", type=int, default=512, help="tokens per calibration segment (default 512)")
  p.add_argument("--eval-tokens", type=int, default=8192,
                 help="with --calibration: perplexity on the first N tokens of The Tempest (default 8192)")
  p.add_argument("--seed", type=int, default=0, help="with --calibration: seed of the segment offsets")
  p.set_defaults(run=_quantize_report)

  p = sub.add_parser("train", help="fine-tune with LoRA, QLoRA or QA-LoRA from a config",
                     description="Train from configs/<x>.py[:k=v,...]; resumes when the workdir holds a "
                                 "checkpoint. Override fields with --config.section.key=value.")
  p.add_argument("--config", required=True, help="configs/<name>.py[:k=v,k=v]")
  p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics.jsonl, result.json)")
  p.add_argument("--overwrite", action="store_true", help="discard a different run found in the workdir")
  p.set_defaults(run=_train)

  p = sub.add_parser("sweep", help="train every cell of a sweep file, each in its own sub-directory",
                     description="Runs configs/sweeps/<x>.py[:arg] cell by cell in DIR/cells/<cell>; re-running "
                                 "skips finished cells and resumes unfinished ones. Exit code 1 if a cell failed "
                                 "(its error is in DIR/cells/<cell>/error.json).")
  p.add_argument("--config", required=True, help="configs/sweeps/<name>.py[:k=v,k=v]")
  p.add_argument("--workdir", required=True, help="sweep directory")
  p.add_argument("--shard", default="0/1", help="i/n: run cells i, i + n, i + 2n, ... (default 0/1: all)")
  p.add_argument("--dry-run", action="store_true", help="list the cells (* marks this shard's) and stop")
  p.set_defaults(run=_sweep)

  p = sub.add_parser("table", help="Markdown and CSV tables and PNG plots from a sweep's results",
                     description="Writes DIR/tables.md, DIR/tables/*.csv and DIR/plots/*.png from the cells' "
                                 "result.json files, as the sweep file's tables and plots say, or one table "
                                 "chosen by --rows/--columns/--value.")
  p.add_argument("--workdir", required=True, help="sweep directory")
  p.add_argument("--rows", help="field(s) naming the rows, comma-separated (e.g. method,bits; default name)")
  p.add_argument("--columns", help="a field whose values become columns (e.g. group_size)")
  p.add_argument("--value", help="metric(s) shown, comma-separated (e.g. merged_ppl)")
  p.add_argument("--out", help="output directory (default: the sweep directory)")
  p.add_argument("--readme", help="a Markdown file whose blocks '<!-- generated from PATH by COMMAND -->' ... "
                                  "'<!-- end -->' naming a file written here (e.g. tables.md) are refilled from it")
  p.set_defaults(run=_table)

  p = sub.add_parser("bench", help="speed and memory figures (one JSON line): train | decode | peaks",
                     description="train: tokens/s of the training step (median of --repeats after warm-up), "
                                 "compile_s, peak_rss_mb, mfu; decode: greedy batch-1 tokens/s; peaks: the "
                                 "machine's float32 matmul FLOP/s and read bandwidth.")
  p.add_argument("what", choices=["train", "decode", "peaks"])
  p.add_argument("--method", help="train: lora | qlora | qalora (default); decode: fp32 | qlora | qalora-merged "
                                  "(default)")
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", help="train: compute dtype (float32 | bfloat16)")
  p.add_argument("--matmul-dtype",
                 help="operand dtype of the weight matmuls, accumulated in float32 (models.Config.matmul_dtype); "
                      "train: bfloat16 (default) | float32; decode: int8 (default: int8 activations against "
                      "INT4 weights in the CPU kernel) | float32 | bfloat16")
  p.add_argument("--remat", action="store_true", help="train: rematerialise each block in the backward pass")
  p.add_argument("--remat-keep", default="", help="train, with --remat: what each block keeps rather than "
                 "recomputes: qkv | mlp | qkv,mlp (models.Config.remat_keep)")
  p.add_argument("--bits", type=int, default=4, help="train, qalora: bits of the INT-k base (2 | 3 | 4 | 8)")
  p.add_argument("--group-size", type=int, default=32, help="train, qalora: inputs per quantization group")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--prompt", type=int, default=32, help="decode: prompt tokens")
  p.add_argument("--embedding", default="float", help="decode: the token table and tied head, float (float32) | "
                                                      "int8 (8-bit codes per 32 inputs, as llama.cpp's Q8_0)")
  p.add_argument("--repeats", type=int, default=5)
  p.set_defaults(run=_bench)

  p = sub.add_parser("eval", help="held-out perplexity of a trained run or a model (JSON line)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training workdir (its base + adapters)")
  source.add_argument("--model", help="asset name, GGUF path, HF directory or merged directory (default data: a "
                                      "merged run's held-out tokens, else The Tempest's first 8192)")
  p.add_argument("--data", help="a text file to evaluate on (default: the config's held-out plays)")
  p.add_argument("--merged", action="store_true", help="evaluate with the adapters merged into the base")
  p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
  p.add_argument("--mc", metavar="DIR", help="few-shot multiple choice on an MMLU-format directory instead")
  p.add_argument("--shots", type=int, default=5, help="few-shot examples per question (with --mc)")
  p.add_argument("--tokens", type=int, help="evaluate the first this many tokens only")
  _matmul_options(p, "float32")
  p.set_defaults(run=_eval)

  p = sub.add_parser("merge", help="fold a run's adapters into its base and save the merged model",
                     description="Writes a model directory (model.safetensors with the QTensors as they are, "
                                 "qalora_model.json, tokenizer.json) that generate/eval/export --model and "
                                 "models.load read.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--requantize", metavar="NAME[:k=v,...]",
                 help="LoRA/QLoRA runs: re-quantize the merged float weights, e.g. int:bits=3,group_size=32")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_merge)

  p = sub.add_parser("generate", help="continue prompts with a model or a trained run")
  source = p.add_mutually_exclusive_group()
  source.add_argument("--model", default="smollm2-135m", help="asset name, GGUF path or HF directory")
  source.add_argument("--workdir", help="a training workdir (its base + adapters)")
  p.add_argument("--merged", action="store_true", help="with --workdir: merge the adapters first")
  p.add_argument("--prompt", required=True, action="append", help="a prompt (repeatable)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  _matmul_options(p, None)
  p.set_defaults(run=_generate)

  p = sub.add_parser("export", help="write a run's adapters (peft) or a merged model (gguf, gptq) for other tools",
                     description="peft: the run's adapters as a PEFT directory. gguf: the merged model as one "
                                 "GGUF file for llama.cpp, INT-k weights exactly (Q4_1 / Q4_0 / Q8_0); a "
                                 "setting with no exact GGUF type is refused, naming the nearest one. gptq: the "
                                 "merged INT-k model as an AutoGPTQ-layout directory (qweight / qzeros / scales "
                                 "/ g_idx); a model that is not asymmetric INT-k is refused.")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run (gguf, gptq: its adapters merged first)")
  source.add_argument("--model", help="gguf, gptq: asset name, GGUF path, HF or merged directory")
  p.add_argument("--format", required=True, choices=["peft", "gguf", "gptq"])
  p.add_argument("--out", required=True)
  p.add_argument("--merged", choices=["exact", "float"], default="exact",
                 help="gguf --workdir: exact (default; QA-LoRA into the offsets) | float (LoRA on a quantized base "
                      "merged into float32 weights)")
  p.add_argument("--requantize", metavar="NAME[:k=v,...]",
                 help="gguf, gptq: quantize the (merged) float block linears first, e.g. int:bits=4,group_size=64")
  p.add_argument("--float-type", choices=["source", "f32", "f16"], default="source",
                 help="gguf: embedding and other float tensors as in the source GGUF when exact (default), f32 or f16")
  p.add_argument("--allow-rounding", action="store_true",
                 help="gguf: write values float16 cannot hold exactly (reports max |dw|); refused otherwise")
  p.add_argument("--zeros", default="int",
                 help="gptq: int (default; zeros that are exact integers, as GPTQ makes them) | float (a merged "
                      "model's fractional zeros exactly, as float32 qzeros_float; stock loaders refuse it) | round "
                      "(nearest integer zeros, for stock loaders; reports max |dw| and the held-out perplexity "
                      "before and after)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_export)
  return parser


def main(argv=None) -> int:
  """The command line (argv None: sys.argv, after re-starting the process once with glibc's large blocks in
  huge pages, hardware.restart_with_huge_pages; a training step runs about 20% faster so)."""
  if argv is None:
    hardware.restart_with_huge_pages()
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  overrides = [a for a in extra if a.startswith("--config.")]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown or (overrides and args.command != "train"):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  args.overrides = overrides
  if args.distributed:
    import jax

    jax.distributed.initialize()  # coordinator, process count and id from the environment (SLURM, TPU pods)
  try:
    return args.run(args)
  except (ValueError, TypeError, RuntimeError, FileNotFoundError, FileExistsError) as e:
    print(f"qalora {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
