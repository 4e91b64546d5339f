"""Bring your own Flax model: `adapt` on NNX models built from nnx.Linear, nnx.LinearGeneral, nnx.Einsum and an
einsum-like module, trained functionally and with nnx.Optimizer, merged, checkpointed; GPTQ calibrated from
the model's own forward pass; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qalora_jax
from qalora_jax import nn, quant
from qalora_jax.train import checkpoints

INT4 = quant.get("int", bits=4, group_size=16, scale_dtype="float32")


class TunixStyleEinsum(nnx.Module):
  """An einsum layer written the way tunix and Gemma write theirs: `einsum_str` and one Param `w`."""

  def __init__(self, einsum_str, shape, *, rngs):
    self.einsum_str = einsum_str
    self.shape = shape
    self.w = nnx.Param(nnx.initializers.normal(0.1)(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.q_proj = nnx.Einsum("btd,dnh->btnh", (d, 4, 8), (4, 8), rngs=rngs)
    self.k_proj = TunixStyleEinsum("BTD,DNH->BTNH", (d, 4, 8), rngs=rngs)
    self.o_proj = nnx.LinearGeneral((4, 8), d, axis=(-2, -1), rngs=rngs)
    self.up = nnx.Linear(d, 64, rngs=rngs)
    self.down = nnx.Linear(64, d, use_bias=False, rngs=rngs)
    self.norm = nnx.RMSNorm(d, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    x = x + self.o_proj(jax.nn.gelu(self.q_proj(h)) * self.k_proj(h))
    return x + self.down(jax.nn.silu(self.up(self.norm(x))))


class TinyLM(nnx.Module):
  """A researcher's own small language model."""

  def __init__(self, vocab=64, d=32, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.layers = nnx.List([Block(d, rngs), Block(d, rngs)])

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.embed.attend(x)


TOKENS = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, 64)
ALL = r"layers/\d+/(q_proj|k_proj|o_proj|up|down)"


def loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train_functional(model, steps=8, lr=1e-2):
  graphdef, adapters, frozen = nnx.split(model, nn.AdapterParam, ...)
  tx = optax.adam(lr)
  opt_state = tx.init(adapters)

  @jax.jit
  def step(adapters, opt_state, frozen, tokens):
    loss, grads = jax.value_and_grad(lambda a: loss_fn(nnx.merge(graphdef, a, frozen), tokens))(adapters)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    adapters, opt_state, loss = step(adapters, opt_state, frozen, TOKENS)
    losses.append(float(loss))
  nnx.update(model, adapters)
  return losses, opt_state, adapters


def test_finds_every_kind_of_linear_layer():
  paths = [p for p, _ in nn.module_layers(TinyLM())]
  assert paths == [f"layers/{i}/{n}" for i in (0, 1) for n in ("down", "k_proj", "o_proj", "q_proj", "up")]


def test_float_layers_compute_what_the_originals_did():
  model = TinyLM()
  originals = {p: m for p, m in nn.module_layers(model)}
  shapes = {"o_proj": (2, 5, 4, 8), "down": (2, 5, 64)}
  x = {p: jax.random.normal(jax.random.PRNGKey(2), shapes.get(p.split("/")[-1], (2, 5, 32))) for p in originals}
  want = {p: m(x[p]) for p, m in originals.items()}
  qalora_jax.adapt(model, nn.Rule(ALL))  # no quantizer, no adapter: the layer is only rewritten as ours
  for p, layer in nn.adapted_layers(model):
    np.testing.assert_allclose(layer(x[p]), want[p], rtol=1e-5, atol=1e-5)
  # attributes other code reads survive
  assert model.layers[0].k_proj.shape == (32, 4, 8) and model.layers[0].o_proj.in_features == (4, 8)


def test_qalora_pools_over_every_contracted_axis():
  """o_proj contracts (heads, head_dim) = (4, 8): 32 inputs in groups of 16, pooled in that flattened order."""
  model = TinyLM()
  qalora_jax.adapt(model, nn.Rule(r"layers/0/o_proj", INT4, "qalora", rank=3, alpha=6.0))
  layer = model.layers[0].o_proj
  layer.adapter.b[...] = jax.random.normal(jax.random.PRNGKey(4), layer.adapter.b.shape)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 5, 4, 8)))
  w = np.asarray(layer.kernel.get_value().dequantize(), np.float64)  # [32, 32]
  a, b = np.asarray(layer.adapter.a[...], np.float64), np.asarray(layer.adapter.b[...], np.float64)
  flat = x.reshape(2, 5, 32)
  pooled = flat.reshape(2, 5, 2, 16).sum(-1)  # sum pooling over each group of 16 inputs
  want = flat @ w + np.asarray(layer.bias[...]) + 2.0 * (pooled @ a) @ b
  np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)


def test_split_gives_adapters_and_a_frozen_base():
  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, INT4, "qalora", rank=4))
  graphdef, adapters, rest = nnx.split(model, nn.AdapterParam, ...)
  leaves = jax.tree_util.tree_leaves_with_path(adapters)
  assert len(leaves) == 2 * 10 and all(jax.tree_util.keystr(p).count("adapter") == 1 for p, _ in leaves)
  # the flax idiom picks them up: nn.AdapterParam is an nnx.LoRAParam, and the base is not an nnx.Param
  assert jax.tree.structure(nnx.state(model, nnx.LoRAParam)) == jax.tree.structure(adapters)
  frozen = nnx.state(model, nn.Frozen)
  assert sum(isinstance(v.get_value(), quant.QTensor) for v in jax.tree.leaves(
      frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))) == 10
  assert not any(isinstance(v.get_value(), quant.QTensor) for v in jax.tree.leaves(
      nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)))
  stats = nn.stats(model)
  assert stats["adapter_params"] == sum(x.size for x in jax.tree.leaves(adapters))


def test_functional_and_stateful_training_agree_and_touch_only_adapters():
  rule = nn.Rule(ALL, INT4, "qalora", rank=4)
  functional = qalora_jax.adapt(TinyLM(), rule)
  before = nnx.state(functional, nnx.Not(nn.AdapterParam))
  losses, opt_state, adapters = train_functional(functional)
  assert losses[-1] < losses[0]
  # optimizer state: two moments per adapter value, nothing for the frozen base
  moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(adapters))
  after = nnx.state(functional, nnx.Not(nn.AdapterParam))
  assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

  stateful = qalora_jax.adapt(TinyLM(), rule)
  optimizer = nnx.Optimizer(stateful, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, tokens)
    optimizer.update(model, grads)
    return loss

  for _ in range(8):
    step(stateful, optimizer, TOKENS)
  for x, y in zip(jax.tree.leaves(nnx.state(functional, nn.AdapterParam)),
                  jax.tree.leaves(nnx.state(stateful, nn.AdapterParam))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_qalora_merge_is_exact_and_keeps_the_int4_bytes():
  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, INT4, "qalora", rank=4))
  train_functional(model)
  frozen_bytes = nn.stats(model)["frozen_bytes"]
  unmerged = model(TOKENS)
  qalora_jax.merge(model)
  merged = model(TOKENS)
  assert float(jnp.abs(merged - unmerged).max()) <= 1e-4 * float(jnp.abs(unmerged).max())
  assert not jax.tree.leaves(nnx.state(model, nn.AdapterParam))
  assert all(isinstance(m.kernel.get_value(), quant.QTensor) and m.kernel.get_value().bits == 4
             for _, m in nn.adapted_layers(model))
  assert nn.stats(model)["frozen_bytes"] == frozen_bytes


def test_lora_merge_gives_float_kernels_or_requantized_ones():
  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, quant.get("nf4", block_size=32), "lora", rank=4))
  train_functional(model, steps=3)
  unmerged = model(TOKENS)
  float_model = qalora_jax.merge(nnx.clone(model))
  np.testing.assert_allclose(float_model(TOKENS), unmerged, rtol=1e-4, atol=1e-4 * float(jnp.abs(unmerged).max()))
  assert all(not isinstance(m.kernel.get_value(), quant.QTensor) for _, m in nn.adapted_layers(float_model))
  requantized = qalora_jax.merge(model, requantize=INT4)
  assert all(m.kernel.get_value().format == "int" for _, m in nn.adapted_layers(requantized))


def test_adapter_state_checkpoints_with_orbax(tmp_path):
  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, INT4, "qalora", rank=4))
  train_functional(model, steps=2)
  trained = nnx.state(model, nn.AdapterParam)
  checkpoints.save_adapters(tmp_path / "adapters", 2, trained)
  fresh = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, INT4, "qalora", rank=4))
  step, restored = checkpoints.restore_adapters(tmp_path / "adapters", nnx.state(fresh, nn.AdapterParam))
  assert step == 2
  nnx.update(fresh, restored)
  np.testing.assert_array_equal(fresh(TOKENS), model(TOKENS))
  # the adapters' description travelled with the state
  assert fresh.layers[0].up.adapter.meta == model.layers[0].up.adapter.meta


def test_dropout_uses_the_adapters_own_stream_until_eval():
  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL, INT4, "qalora", rank=4, dropout=0.5), rngs=nnx.Rngs(dropout=3))
  for _, m in nn.adapted_layers(model):
    m.adapter.b[...] = jnp.ones_like(m.adapter.b[...])
  assert not np.allclose(model(TOKENS), model(TOKENS))  # a fresh mask each call
  model.eval()
  np.testing.assert_array_equal(model(TOKENS), model(TOKENS))


# ---------------------------------------------------------------------------------------- calibration


class TwoLinears(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(32, 32, use_bias=False, rngs=rngs)
    self.k = nnx.Linear(32, 32, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(32, 16, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.q(x)) * self.k(x))


def test_gptq_reads_each_layers_inputs_from_the_forward_pass_true_sequential():
  gptq = quant.get("gptq", bits=3, group_size=16)
  batches = [jax.random.normal(jax.random.PRNGKey(i), (8, 32)) for i in range(3)]
  model = TwoLinears(nnx.Rngs(0))
  float_kernels = {name: np.asarray(getattr(model, name).kernel[...]) for name in ("q", "k", "out")}
  qalora_jax.adapt(model, nn.Rule(r"q|k|out", gptq), calibration=batches)

  # hand-derived: q and k see the same input (one Hessian); `out` sees the product of the QUANTIZED q and k
  x = np.concatenate([np.asarray(b) for b in batches])
  h_in = 2.0 / len(x) * x.T @ x
  want_q = gptq.quantize_with_hessian(jnp.asarray(float_kernels["q"]), jnp.asarray(h_in, jnp.float32))
  want_k = gptq.quantize_with_hessian(jnp.asarray(float_kernels["k"]), jnp.asarray(h_in, jnp.float32))
  for name, want in (("q", want_q), ("k", want_k)):
    np.testing.assert_array_equal(getattr(model, name).kernel.get_value()["codes"], want["codes"])
  act = np.maximum(x @ np.asarray(want_q.dequantize()), 0) * (x @ np.asarray(want_k.dequantize()))
  want_out = gptq.quantize_with_hessian(jnp.asarray(float_kernels["out"]),
                                        jnp.asarray(2.0 / len(act) * act.T @ act, jnp.float32))
  got = model.out.kernel.get_value()
  assert np.mean(np.asarray(got["codes"]) == np.asarray(want_out["codes"])) > 0.99  # float32 sums, reordered


def test_call_order_groups_layers_sharing_an_input():
  from qalora_jax.nn.calibrate import call_order

  model = qalora_jax.adapt(TinyLM(), nn.Rule(ALL))
  layers = dict(nn.adapted_layers(model))
  groups = call_order(model, layers, TOKENS, lambda m, b: m(b))
  assert groups[:3] == [["layers/0/q_proj", "layers/0/k_proj"], ["layers/0/o_proj"], ["layers/0/up"]]
  assert len(groups) == 8


# ---------------------------------------------------------------------------------------------- errors


def test_a_rule_matching_no_layer_lists_the_layers():
  with pytest.raises(ValueError, match=r"Rule\('.\*/gate_proj'\) matches no linear layer; the layers are: "
                                       r"layers/0/down, layers/0/k_proj"):
    qalora_jax.adapt(TinyLM(), nn.Rule(r".*/gate_proj", INT4, "qalora"))


def test_non_nnx_objects_are_refused():
  from flax import linen

  with pytest.raises(ValueError, match="model of type dict is not supported; allowed: a flax.nnx Module"):
    qalora_jax.adapt({"kernel": jnp.ones((4, 4))}, nn.Rule(".*"))
  with pytest.raises(ValueError, match="flax.linen Module; allowed: a flax.nnx Module.*port the model"):
    qalora_jax.adapt(linen.Dense(4), nn.Rule(".*"))


def test_a_kernel_the_quantizer_refuses_names_the_layer():
  with pytest.raises(ValueError, match=r"layers/0/up: kernel \[in, out\] = \[32, 64\] is refused by .*group_size=128"):
    qalora_jax.adapt(TinyLM(), nn.Rule(r"layers/0/up", quant.get("int", bits=4, group_size=128)))


def test_a_failed_adapt_leaves_the_model_unchanged():
  model = TinyLM()
  before = model(TOKENS)
  with pytest.raises(ValueError, match=r"layers/1/up: a qalora adapter needs a base whose groups carry"):
    qalora_jax.adapt(model, [nn.Rule(r"layers/0/.*", INT4, "qalora"),
                             nn.Rule(r"layers/1/up", quant.get("nf4", block_size=32), "qalora")])
  assert not nn.adapted_layers(model)
  np.testing.assert_array_equal(model(TOKENS), before)


def test_qalora_group_size_must_be_the_bases():
  with pytest.raises(ValueError, match=r"layers/0/up: Rule.group_size=32 differs from the base quantizer's group "
                                       r"size 16"):
    qalora_jax.adapt(TinyLM(), nn.Rule(r"layers/0/up", INT4, "qalora", group_size=32))
  with pytest.raises(ValueError, match=r"layers/0/up: a qalora adapter needs a base whose groups carry an additive"):
    qalora_jax.adapt(TinyLM(), nn.Rule(r"layers/0/up", quant.get("nf4", block_size=32), "qalora"))


def test_a_batched_einsum_is_refused():
  class Batched(nnx.Module):
    def __init__(self, rngs):
      self.experts = nnx.Einsum("ebd,edf->ebf", (4, 8, 16), rngs=rngs)

  with pytest.raises(ValueError, match=r"experts: einsum 'ebd,edf->ebf' keeps kernel axis 'e' in both input and "
                                       r"output \(a batched product\) whose contraction the adapter cannot pool"):
    qalora_jax.adapt(Batched(nnx.Rngs(0)), nn.Rule("experts", INT4, "qalora"))


def test_bad_rules():
  with pytest.raises(ValueError, match=r"Rule.method='dora' is not supported; allowed: None, lora, qalora"):
    nn.Rule(".*", INT4, "dora")
  with pytest.raises(ValueError, match=r"method='qalora' needs a quantizer"):
    nn.Rule(".*", None, "qalora")
  with pytest.raises(ValueError, match=r"rules\[0\]='.\*' is not supported; allowed: qalora_jax.nn.Rule"):
    qalora_jax.adapt(TinyLM(), [".*"])
