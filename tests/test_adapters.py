"""LoRA and QA-LoRA adapters on one linear layer: forward, init, pooling, exact merge, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import nn, quant


def random_adapter(kind, n_in, n_out, rank=4, group_size=0, alpha=8.0, seed=0, dropout=0.0):
  """An adapter with B != 0 (as after training)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  ad = nn.init_adapter(k1, kind, n_in, n_out, rank, alpha=alpha, group_size=group_size, dropout=dropout)
  return nn.Adapter(ad.a, 0.1 * jax.random.normal(k2, ad.b.shape), ad.meta)


def test_pool_groups_sums_each_group():
  x = jnp.arange(6.0)[None]
  np.testing.assert_array_equal(nn.pool_groups(x, 2), [[1, 5, 9]])
  np.testing.assert_array_equal(nn.pool_groups(x, 4), [[6, 9]])  # short last group: 4 + 5


def test_init_follows_peft():
  ad = nn.init_adapter(jax.random.PRNGKey(0), "lora", 64, 32, 8, alpha=16)
  assert ad.a.shape == (64, 8) and ad.b.shape == (8, 32)
  assert not np.asarray(ad.b).any()
  assert np.abs(np.asarray(ad.a)).max() <= 1 / 8  # U(-1/sqrt(in), 1/sqrt(in))
  assert ad.meta.scale == 2.0
  rs = nn.init_adapter(jax.random.PRNGKey(0), "lora", 64, 32, 16, alpha=16, rslora=True)
  assert rs.meta.scale == 4.0  # alpha / sqrt(r)
  qa = nn.init_adapter(jax.random.PRNGKey(0), "qalora", 80, 32, 8, alpha=16, group_size=32)
  assert qa.a.shape == (3, 8)  # ceil(80 / 32) groups
  stacked = nn.init_adapter(jax.random.PRNGKey(0), "lora", 64, 32, 8, alpha=16, lead=(3,))
  assert stacked.a.shape == (3, 64, 8) and not np.allclose(stacked.a[0], stacked.a[1])


@pytest.mark.parametrize("kind, group", [("lora", 0), ("qalora", 16)])
def test_linear_matches_the_formula(kind, group):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 48)).astype(np.float32)
  w = rng.normal(size=(48, 20)).astype(np.float32)
  bias = rng.normal(size=(20,)).astype(np.float32)
  ad = random_adapter(kind, 48, 20, group_size=group)
  a, b = np.asarray(ad.a), np.asarray(ad.b)
  pooled = x.reshape(3, 3, 16).sum(-1) if kind == "qalora" else x
  expected = x @ w + bias + ad.meta.scale * (pooled @ a) @ b
  got = nn.linear(jnp.asarray(x), {"kernel": w, "bias": bias, "adapter": ad})
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_a_rematerialised_adapter_keeps_its_pooled_input_and_hidden_product():
  """With nn.adapters.REMAT_SAVED kept, the gradient of a checkpointed QA-LoRA linear makes the group sums and
  pool(x) A once, in the forward pass; with nothing kept it makes both again. The gradients are the same."""
  from models_testing import equations

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
  ad = random_adapter("qalora", 64, 24, group_size=16)

  def layer(x, a, b):
    return jnp.sum(jnp.sin(nn.linear(x, {"kernel": w, "adapter": nn.Adapter(a, b, ad.meta)})))

  def grad(policy):
    return jax.grad(jax.checkpoint(layer, policy=policy), (0, 1, 2))

  def count(fn, name):
    return sum(e.primitive.name == name for e in equations(jax.make_jaxpr(fn)(x, ad.a, ad.b).jaxpr))

  kept, none = jax.checkpoint_policies.save_only_these_names(*nn.adapters.REMAT_SAVED), None
  assert count(grad(none), "reduce_sum") - count(grad(kept), "reduce_sum") == 1  # the group sums
  assert count(grad(none), "dot_general") - count(grad(kept), "dot_general") == 1  # pool(x) A
  for g0, g1 in zip(grad(kept)(x, ad.a, ad.b), jax.grad(layer, (0, 1, 2))(x, ad.a, ad.b)):
    np.testing.assert_allclose(g0, g1, rtol=1e-6)


def test_dropout_touches_only_the_adapter_branch():
  x = jnp.ones((2, 32))
  w = jnp.eye(32)
  ad = nn.init_adapter(jax.random.PRNGKey(1), "lora", 32, 32, 4, alpha=4, dropout=0.5)  # B = 0
  y = nn.linear(x, {"kernel": w, "adapter": ad}, dropout_rng=jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # base path never dropped
  ad = random_adapter("lora", 32, 32, dropout=0.5)
  y1 = nn.linear(x, {"kernel": w, "adapter": ad}, dropout_rng=jax.random.PRNGKey(2))
  y0 = nn.linear(x, {"kernel": w, "adapter": ad})
  assert not np.allclose(y1, y0)
  np.testing.assert_array_equal(np.asarray(nn.linear(x, {"kernel": w, "adapter": ad})), np.asarray(y0))


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("n_in, group", [(64, 32), (80, 32), (96, -1)])
def test_qalora_merge_is_exact_and_stays_int(bits, n_in, group):
  rng = np.random.default_rng(bits)
  w = rng.normal(size=(n_in, 24)).astype(np.float32)
  qt = quant.get("int", bits=bits, group_size=group, scale_dtype="float32").quantize(w)
  ad = random_adapter("qalora", n_in, 24, group_size=qt.group_size)
  x = jnp.asarray(rng.normal(size=(5, n_in)).astype(np.float32))
  unmerged = nn.linear(x, {"kernel": qt, "adapter": ad})
  merged_qt = nn.merge_into_offsets(qt, ad)
  merged = nn.linear(x, {"kernel": merged_qt})
  assert float(jnp.abs(merged - unmerged).max()) <= 1e-5 * float(jnp.abs(unmerged).max())
  assert merged_qt.meta == qt.meta and merged_qt.nbytes == qt.nbytes
  np.testing.assert_array_equal(np.asarray(merged_qt["codes"]), np.asarray(qt["codes"]))
  np.testing.assert_array_equal(np.asarray(merged_qt["scale"]), np.asarray(qt["scale"]))


def test_qalora_merge_of_stacked_layers():
  rng = np.random.default_rng(0)
  ws = rng.normal(size=(2, 64, 8)).astype(np.float32)
  q = quant.get("int", bits=4, group_size=32, scale_dtype="float32")
  qt = jax.tree.map(lambda *xs: jnp.stack(xs), *[q.quantize(w) for w in ws])
  ad = random_adapter("qalora", 64, 8, group_size=32)
  ad = nn.Adapter(jnp.stack([ad.a, -ad.a]), jnp.stack([ad.b, ad.b]), ad.meta)
  merged = nn.merge_into_offsets(qt, ad).dequantize()
  for layer in range(2):
    one = nn.Adapter(ad.a[layer], ad.b[layer], ad.meta)
    single = jax.tree.map(lambda x: x[layer], qt)
    np.testing.assert_allclose(np.asarray(merged[layer]),
                               np.asarray(nn.merge_into_offsets(single, one).dequantize()), rtol=0, atol=0)


def test_lora_merge_adds_the_product_and_can_requantize():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(64, 16)).astype(np.float32)
  base = quant.get("nf4", block_size=64).quantize(w)
  ad = random_adapter("lora", 64, 16)
  merged = nn.merge_into_kernel(base, ad)
  expected = np.asarray(base.dequantize()) + ad.meta.scale * np.asarray(ad.a) @ np.asarray(ad.b)
  np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-5, atol=1e-6)
  requantized = nn.merge_into_kernel(base, ad, requantize=quant.get("int", bits=4, group_size=32))
  assert isinstance(requantized, quant.QTensor) and requantized.format == "int"


@pytest.mark.parametrize("kernel, message", [
    ("float", "needs a group-quantized base weight"),
    ("symmetric", "needs a base whose groups carry an additive offset"),
    ("nf4", "needs a base whose groups carry an additive offset"),
    ("g16", "pooling group 32 differs from the base quantizer's group size 16"),
])
def test_qalora_needs_a_matching_group_offset_base(kernel, message):
  w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  kernel = {"float": lambda: w,
            "symmetric": lambda: quant.get("int", group_size=32, symmetric=True).quantize(w),
            "nf4": lambda: quant.get("nf4", block_size=32).quantize(w),
            "g16": lambda: quant.get("int", group_size=16).quantize(w)}[kernel]()
  with pytest.raises(ValueError, match=message):
    nn.merge_into_offsets(kernel, random_adapter("qalora", 64, 8, group_size=32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="dora"), "kind='dora' is not supported; allowed: lora, qalora"),
    (dict(rank=0), "rank=0 must be a positive integer"),
    (dict(kind="qalora", group_size=0), "group_size=0 must be in 1..64"),
    (dict(dropout=1.0), "dropout=1.0 must be in"),
])
def test_bad_adapter_options(kwargs, message):
  args = dict(kind="lora", n_in=64, n_out=8, rank=4) | kwargs
  with pytest.raises(ValueError, match=message):
    nn.init_adapter(jax.random.PRNGKey(0), args.pop("kind"), args.pop("n_in"), args.pop("n_out"),
                    args.pop("rank"), alpha=8, **args)
