"""A 1B-class model from a Hugging Face directory on GPUs: QA-LoRA (or LoRA / QLoRA) with GPU-sized batches.

    qalora train --config configs/gpu_1b.py:model=/data/Llama-3.2-1B --workdir runs/gpu-1b
    qalora train --config configs/gpu_1b.py:model=/data/Qwen2.5-1.5B,method=lora,rank=64 --workdir runs/q-lora
    qalora sweep --config configs/sweeps/gpu_1b.py:model=/data/Llama-3.2-1B --workdir runs/gpu-1b-sweep

model: any LLaMA, Mistral or Qwen2 directory (config.json, *.safetensors, tokenizer.json). Defaults: INT4 g32
base, r = 16 on all seven linears, 8 x 2048 tokens per step, bf16 compute and matmuls, the mesh over every
device (data parallelism; fsdp=N splits the base and the optimizer state over N devices, e.g. for 7B+). The
batch must split over the devices: batch=16 on 16 GPUs, or accum=2 for a larger batch in two micro-batches.
local=true shrinks everything to the tiny random model for a smoke test on a CPU (big_vision's runlocal).
"""

from qalora_jax.train.config import base_config, parse_arg

METHODS = ("qalora", "lora", "qlora")


def get_config(arg=None):
  args = {"model": "", "method": "qalora", "bits": 4, "group_size": 32, "rank": 16, "steps": 1000, "batch": 8,
          "seq": 2048, "accum": 1, "fsdp": 1, "remat": False, "lr": 2e-4, "local": False} | parse_arg(arg)
  if args["method"] not in METHODS:
    raise ValueError(f"configs/gpu_1b.py: method={args['method']!r} is not supported; allowed: {', '.join(METHODS)}")
  if not args["model"] and not args["local"]:
    raise ValueError("configs/gpu_1b.py: model= is required: a Hugging Face LLaMA, Mistral or Qwen2 directory "
                     "(config.json, *.safetensors, tokenizer.json), e.g. model=/data/Llama-3.2-1B; or local=true")
  c = base_config()
  c.model.name = "tiny" if args["local"] else str(args["model"])
  c.model.dtype = "bfloat16"
  c.model.matmul_dtype = "bfloat16"
  c.model.remat = bool(args["remat"])
  if args["method"] == "lora":
    c.base.quantizer, c.base.options, c.adapter.method = "none", {}, "lora"
  elif args["method"] == "qlora":
    c.base.quantizer, c.base.options = "nf4", {"block_size": 64, "double_quant": True}
    c.adapter.method = "lora"
  else:
    c.base.quantizer, c.adapter.method = "int", "qalora"
    c.base.options = {"bits": args["bits"], "group_size": args["group_size"]}
  c.adapter.rank = args["rank"]
  c.adapter.alpha = 2.0 * args["rank"]
  c.data.seq_len = args["seq"]
  c.data.batch_size = args["batch"]
  c.data.eval_tokens = 65536
  c.optim.accum_steps = args["accum"]
  c.optim.learning_rate = args["lr"]
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = max(1, args["steps"] // 20)
  c.steps = args["steps"]
  c.log_every = 10
  c.eval_every = 250
  c.checkpoint_every = 250
  c.mesh.data, c.mesh.fsdp = 0, args["fsdp"]  # data = 0: every device the fsdp axis leaves
  if args["local"]:
    c.data.seq_len, c.data.batch_size, c.data.eval_tokens = 32, 2 * args["accum"], 512
    c.adapter.rank, c.adapter.alpha = 4, 8.0
    c.model.dtype = c.model.matmul_dtype = "float32"
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 0, 4
    if args["method"] == "qalora":
      c.base.options = {"bits": args["bits"], "group_size": 16}
    elif args["method"] == "qlora":
      c.base.options = {"block_size": 32, "double_quant": True}
  return c
