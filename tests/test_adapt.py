"""Adapters over a parameter tree: layer selection, parameter counts, combine, merge, bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import nn, quant

# SmolLM2-135M: 30 blocks, hidden 576, 9 heads x 64, 3 KV heads, FFN 1536 (REFERENCE.md section 5).
L, D, KV, F = 30, 576, 192, 1536
SMOLLM2_LINEARS = {"attn": {"q_proj": (D, D), "k_proj": (D, KV), "v_proj": (D, KV), "o_proj": (D, D)},
                   "mlp": {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}}


def shape_tree(kernel_fn):
  blocks = {group: {name: {"kernel": kernel_fn(shape)} for name, shape in layers.items()}
            for group, layers in SMOLLM2_LINEARS.items()}
  return {"blocks": blocks, "lm_head": {"kernel": jax.ShapeDtypeStruct((D, 49152), jnp.float32)},
          "final_norm": {"scale": jax.ShapeDtypeStruct((D,), jnp.float32)}}


def int_qtensor_shape(shape, g=32, bits=4):
  """The shapes of a stacked INT-k QTensor, without computing one."""
  n_in, n_out = shape
  groups = -(-n_in // g)
  arrays = {"codes": jax.ShapeDtypeStruct((L, quant.packed_length(n_in, bits), n_out), jnp.uint32),
            "scale": jax.ShapeDtypeStruct((L, groups, n_out), jnp.float16),
            "offset": jax.ShapeDtypeStruct((L, groups, n_out), jnp.float16)}
  return quant.QTensor(arrays, quant.QMeta("int", shape, bits, g, (("symmetric", False),)))


def test_lora_parameter_count_on_smollm2_matches_peft():
  frozen = shape_tree(lambda s: jax.ShapeDtypeStruct((L,) + s, jnp.float32))
  adapters = jax.eval_shape(lambda: nn.add_adapters(frozen, "lora", rank=16, alpha=32, key=jax.random.PRNGKey(0)))
  assert nn.count_params(adapters) == 4_884_480  # what PEFT reports (REFERENCE.md section 3)
  assert "lm_head" not in adapters


def test_qalora_parameter_count_on_smollm2():
  frozen = shape_tree(int_qtensor_shape)
  adapters = jax.eval_shape(lambda: nn.add_adapters(frozen, "qalora", rank=16, alpha=32, key=jax.random.PRNGKey(0)))
  # r * (ceil(in / 32) + out) per layer
  per_block = sum(16 * (-(-i // 32) + o) for layers in SMOLLM2_LINEARS.values() for i, o in layers.values())
  assert per_block == 85_440
  assert nn.count_params(adapters) == 30 * per_block == 2_563_200


def tiny_frozen(method):
  rng = np.random.default_rng(0)
  frozen = {"blocks": {"attn": {"q_proj": {"kernel": rng.normal(size=(2, 64, 32)).astype(np.float32)}},
                       "norm": {"scale": np.ones((2, 64), np.float32)}},
            "lm_head": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
  if method == "qalora":
    q = quant.get("int", bits=4, group_size=32, scale_dtype="float32")
    k = frozen["blocks"]["attn"]["q_proj"]["kernel"]
    frozen["blocks"]["attn"]["q_proj"]["kernel"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[q.quantize(w) for w in k])
  return frozen


@pytest.mark.parametrize("method", ["lora", "qalora"])
def test_combine_and_merge(method):
  frozen = tiny_frozen(method)
  adapters = nn.add_adapters(frozen, method, rank=2, alpha=8, key=jax.random.PRNGKey(0))
  assert list(path for path, _ in nn.linear_layers(nn.combine(frozen, adapters))) == ["blocks/attn/q_proj", "lm_head"]
  adapter = adapters["blocks"]["attn"]["q_proj"]["adapter"]
  adapters["blocks"]["attn"]["q_proj"]["adapter"] = nn.Adapter(adapter.a, adapter.b + 0.1, adapter.meta)
  params = nn.combine(frozen, adapters)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 64)), jnp.float32)
  merged = nn.merge_params(frozen, adapters)
  assert not any(isinstance(leaf, nn.Adapter)
                 for leaf in jax.tree.leaves(merged, is_leaf=lambda t: isinstance(t, nn.Adapter)))
  for layer in range(2):
    take = lambda t: jax.tree.map(lambda a: a[layer], t)  # noqa: E731
    unmerged_y = nn.linear(x, take(params["blocks"]["attn"]["q_proj"]))
    merged_y = nn.linear(x, take(merged["blocks"]["attn"]["q_proj"]))
    np.testing.assert_allclose(np.asarray(merged_y), np.asarray(unmerged_y),
                               atol=1e-5 * float(jnp.abs(unmerged_y).max()))
  if method == "qalora":
    assert nn.tree_nbytes(merged) == nn.tree_nbytes(frozen)
    assert isinstance(merged["blocks"]["attn"]["q_proj"]["kernel"], quant.QTensor)


def test_targets_matching_nothing_lists_the_layers():
  with pytest.raises(ValueError, match="matches no linear layer; the layers are: blocks/attn/q_proj, lm_head"):
    nn.add_adapters(tiny_frozen("lora"), "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0), targets=".*/nope")


def test_qalora_on_a_float_base_names_the_layer():
  with pytest.raises(ValueError, match="blocks/attn/q_proj: a qalora adapter needs a group-quantized base"):
    nn.add_adapters(tiny_frozen("lora"), "qalora", rank=4, alpha=8, key=jax.random.PRNGKey(0))


def test_rank_above_what_a_layer_can_use_warns_once():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    nn.add_adapters(tiny_frozen("qalora"), "qalora", rank=2, alpha=8, key=jax.random.PRNGKey(0),
                    targets=".*q_proj")
    assert not caught
    nn.add_adapters(tiny_frozen("qalora"), "qalora", rank=8, alpha=8, key=jax.random.PRNGKey(0),
                    targets=".*q_proj")
  assert len(caught) == 1
  assert "blocks/attn/q_proj (effective rank 2)" in str(caught[0].message)  # 64 / 32 groups


def test_unknown_method():
  with pytest.raises(ValueError, match="method='dora' is not supported; allowed: lora, qalora"):
    nn.add_adapters(tiny_frozen("lora"), "dora", rank=4, alpha=8, key=jax.random.PRNGKey(0))


def test_a_layers_initial_adapter_depends_on_its_path_only():
  """The same tree in another dict order (a calibrated base comes back from an NNX state in sorted order, the
  loader's in the model's), or with other layers adapted, gives each layer the same initial adapter."""
  frozen = tiny_frozen("lora")
  reordered = {key: frozen[key] for key in reversed(list(frozen))}
  key = jax.random.PRNGKey(3)
  both = nn.add_adapters(frozen, "lora", rank=2, alpha=8, key=key, targets=".*")
  for other in (nn.add_adapters(reordered, "lora", rank=2, alpha=8, key=key, targets=".*"),
                nn.add_adapters(frozen, "lora", rank=2, alpha=8, key=key, targets="blocks/attn/q_proj")):
    a = other["blocks"]["attn"]["q_proj"]["adapter"].a
    np.testing.assert_array_equal(np.asarray(a), np.asarray(both["blocks"]["attn"]["q_proj"]["adapter"].a))
  q_a, head_a = both["blocks"]["attn"]["q_proj"]["adapter"].a, both["lm_head"]["adapter"].a
  assert not np.array_equal(head_a[:2], q_a[0, :2])  # different paths, different draws
