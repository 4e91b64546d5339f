"""The GPU config family (configs/gpu_1b.py) and its sweep: every variant validates before anything runs, the
mesh spans every device by default, a missing model directory or an unknown method is refused by name."""

from pathlib import Path

import pytest

from qalora_jax.train import config as config_lib
from qalora_jax.train import sweep as sweep_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "gpu_1b.py")
SWEEP = str(ROOT / "configs" / "sweeps" / "gpu_1b.py")


def test_gpu_config_defaults():
  c = config_lib.load(f"{CONFIG}:model=/data/Llama-3.2-1B")
  assert c.model.name == "/data/Llama-3.2-1B"
  assert (c.model.dtype, c.model.matmul_dtype) == ("bfloat16", "bfloat16")
  assert (c.data.batch_size, c.data.seq_len) == (8, 2048)
  assert (c.mesh.data, c.mesh.fsdp) == (0, 1)  # every device
  assert (c.base.quantizer, c.base.options.to_dict(), c.adapter.method) == (
      "int", {"bits": 4, "group_size": 32}, "qalora")
  c = config_lib.load(f"{CONFIG}:model=/m,method=qlora,fsdp=4,batch=32,accum=2,rank=64",
                      ["--config.optim.learning_rate=1e-4"])
  assert (c.base.quantizer, c.adapter.method, c.mesh.fsdp, c.optim.accum_steps, c.adapter.rank) == (
      "nf4", "lora", 4, 2, 64)
  for method in ("lora", "qlora", "qalora"):
    assert config_lib.load(f"{CONFIG}:local=true,method={method}").model.name == "tiny"


def test_gpu_config_refuses_a_missing_model_and_unknown_methods():
  with pytest.raises(ValueError, match="configs/gpu_1b.py: model= is required: a Hugging Face LLaMA"):
    config_lib.load(CONFIG)
  with pytest.raises(ValueError, match=r"method='dora' is not supported; allowed: qalora, lora, qlora"):
    config_lib.load(f"{CONFIG}:model=/m,method=dora")


def test_gpu_sweep_cells_all_validate():
  names = [c.name for c in sweep_lib.load(f"{SWEEP}:model=/data/Llama-3.2-1B").cells]
  assert names[:2] == ["LoRA", "QLoRA"] and "QA-LoRA 2-bit g128 r16" in names and "QA-LoRA 4-bit g32 r64" in names
  assert len(sweep_lib.load(f"{SWEEP}:local=true").cells) == 6
