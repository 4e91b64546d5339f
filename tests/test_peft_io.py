"""PEFT adapter directories: round trip, PEFT's key names and layouts, the QA-LoRA pooling constant."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from qalora_jax import nn, quant
from qalora_jax.export import peft as peft_io
from qalora_jax.models import llama


def stacked_frozen(method, n_layers=2):
  rng = np.random.default_rng(0)
  shapes = {"attn": {"q_proj": (64, 64), "k_proj": (64, 32)}, "mlp": {"down_proj": (96, 64)}}
  q = quant.get("int", bits=4, group_size=32, scale_dtype="float32")
  blocks = {}
  for group, layers in shapes.items():
    blocks[group] = {}
    for name, (n_in, n_out) in layers.items():
      ws = rng.normal(size=(n_layers, n_in, n_out)).astype(np.float32)
      kernel = ws if method == "lora" else jax.tree.map(lambda *xs: jnp.stack(xs), *[q.quantize(w) for w in ws])
      blocks[group][name] = {"kernel": kernel}
  return {"blocks": blocks}


def trained(adapters, seed=0):
  """B != 0, as after training."""
  out = {}
  for key, value in adapters.items():
    if isinstance(value, nn.Adapter):
      b = 0.1 * jax.random.normal(jax.random.PRNGKey(seed), value.b.shape)
      out[key] = nn.Adapter(value.a, b, value.meta)
    else:
      out[key] = trained(value, seed + 1)
  return out


@pytest.mark.parametrize("method", ["lora", "qalora"])
def test_round_trip(method, tmp_path):
  frozen = stacked_frozen(method)
  adapters = trained(nn.add_adapters(frozen, method, rank=2, alpha=4, key=jax.random.PRNGKey(0)))
  out = peft_io.export_peft(adapters, tmp_path / "peft", base_model="toy")
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 2 and config["lora_alpha"] == 4 and config["use_qalora"] == (method == "qalora")
  assert config["target_modules"] == ["down_proj", "k_proj", "q_proj"]
  tensors = load_file(str(out / "adapter_model.safetensors"))
  a_in = 64 // 32 if method == "qalora" else 64
  assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"].shape == (2, a_in)
  assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 2)
  assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 2)
  back = peft_io.import_peft(out, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(adapters)
  for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(back)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path):
  frozen = stacked_frozen("lora")
  adapters = nn.add_adapters(frozen, "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0))
  (tmp_path / "peft").mkdir()
  with pytest.raises(FileExistsError):
    peft_io.export_peft(adapters, tmp_path / "peft")
  assert list((tmp_path / "peft").iterdir()) == []
  assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary directory left behind


def test_import_rejects_mismatched_shapes(tmp_path):
  frozen = stacked_frozen("lora")
  adapters = nn.add_adapters(frozen, "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0))
  out = peft_io.export_peft(adapters, tmp_path / "peft")
  other = stacked_frozen("lora")
  other["blocks"]["attn"]["q_proj"]["kernel"] = np.zeros((2, 48, 64), np.float32)
  with pytest.raises(ValueError, match=r"blocks/attn/q_proj layer 0: adapter shapes lora_A \(4, 64\)"):
    peft_io.import_peft(out, other)
  with pytest.raises(ValueError, match=r"blocks/attn/k_proj: adapter covers layers \[0, 1\]..., the model has 3"):
    peft_io.import_peft(out, stacked_frozen("lora", n_layers=3))
  with pytest.raises(ValueError, match=r"blocks/attn/k_proj: the tree's blocks are per layer \(blocks/0/...\); import "
                                       r"into the stacked tree"):
    peft_io.import_peft(out, llama.unstack_blocks(frozen))


def test_qalora_export_matches_peft_forward(tmp_path):
  """PEFT's own use_qalora forward on our exported weights gives our adapter branch."""
  torch = pytest.importorskip("torch")
  variants = pytest.importorskip("peft.tuners.lora.variants")
  frozen = stacked_frozen("qalora", n_layers=1)
  adapters = trained(nn.add_adapters(frozen, "qalora", rank=3, alpha=6, key=jax.random.PRNGKey(0),
                                     targets=".*down_proj"))
  out = peft_io.export_peft(adapters, tmp_path / "peft")
  tensors = load_file(str(out / "adapter_model.safetensors"))
  prefix = "base_model.model.model.layers.0.mlp.down_proj"
  lora_a = torch.nn.Linear(96 // 32, 3, bias=False)
  lora_b = torch.nn.Linear(3, 64, bias=False)
  with torch.no_grad():
    lora_a.weight.copy_(torch.from_numpy(tensors[f"{prefix}.lora_A.weight"]))
    lora_b.weight.copy_(torch.from_numpy(tensors[f"{prefix}.lora_B.weight"]))

  class Module:  # the attributes PEFT's QALoraLinearVariant.forward reads
    training = False
    in_features = 96
    lora_A, lora_B = {"default": lora_a}, {"default": lora_b}
    lora_dropout = {"default": torch.nn.Identity()}
    scaling = {"default": 6 / 3}
    qalora_group_size = {"default": 32}

  x = np.random.default_rng(3).normal(size=(5, 96)).astype(np.float32)
  peft_delta = variants.QALoraLinearVariant.forward(Module, "default", torch.from_numpy(x), torch.zeros(5, 64))
  adapter = jax.tree.map(lambda t: t[0], adapters["blocks"]["mlp"]["down_proj"]["adapter"])
  ours = nn.adapter_delta(jnp.asarray(x), adapter)
  np.testing.assert_allclose(peft_delta.detach().numpy(), np.asarray(ours), rtol=1e-5, atol=1e-6)
