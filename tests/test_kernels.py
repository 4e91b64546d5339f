"""The INT4 kernels against their references: the Pallas dequantize-matmul (GPU) in interpret mode against
x @ dequantize(W), and the CPU decoding kernel against its plain-JAX arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import quant
from qalora_jax.kernels import cpu_matmul
from qalora_jax.kernels.int4_matmul import int4_matmul, supported


@pytest.mark.parametrize("m, n_in, n_out, group_size", [(1, 256, 128, 32), (37, 384, 192, 64), (8, 256, 64, 128)])
def test_interpret_matches_reference(m, n_in, n_out, group_size):
  rng = np.random.default_rng(m)
  w = rng.normal(size=(n_in, n_out)).astype(np.float32) * 0.05
  qt = quant.get("int", bits=4, group_size=group_size).quantize(w)
  assert supported(qt)
  x = jnp.asarray(rng.normal(size=(m, n_in)), jnp.float32)
  got = int4_matmul(x, qt, interpret=True)
  want = x @ qt.dequantize(jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_leading_axes_and_fallback():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 192)), jnp.float32)
  tiled = quant.get("int", bits=4, group_size=32).quantize(rng.normal(size=(192, 64)).astype(np.float32))
  ragged = quant.get("int", bits=4, group_size=128).quantize(rng.normal(size=(192, 64)).astype(np.float32))
  # 192 inputs: a group of 128 and a short one of 64; blocks of 64 inputs tile them, blocks of 128 do not
  assert supported(ragged) and not supported(ragged, block_k=128)
  for qt, block_k in ((tiled, 64), (ragged, 128)):
    got = int4_matmul(x, qt, block_k=block_k, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ qt.dequantize()), rtol=1e-5, atol=1e-4)
  assert int4_matmul(x, tiled, block_k=64, interpret=True).shape == (2, 3, 64)
  with pytest.raises(ValueError, match="x has 100 features; the weight expects in=192"):
    int4_matmul(jnp.zeros((1, 100)), tiled, interpret=True)


# The CPU decoding kernel (kernels/cpu_matmul.py): int8 activations against packed INT4 (or INT8) codes.

def _int4(n_in, n_out, group_size, seed=0, **options):
  w = np.random.default_rng(seed).normal(size=(n_in, n_out)).astype(np.float32) * 0.05
  return quant.get("int", **{"bits": 4, "group_size": group_size, **options}).quantize(w)


def test_cpu_reference_is_exact_when_the_activations_are_int8_already():
  qt = _int4(128, 48, 32)
  rng = np.random.default_rng(1)
  # Per block of 16: integers in [-127, 127] with one at +-127, times a per-block step: int8 quantization is exact.
  xq = rng.integers(-127, 128, size=(3, 8, 16)).astype(np.float32)
  xq[..., 0] = 127
  x = jnp.asarray((xq * rng.uniform(0.01, 0.1, size=(3, 8, 1))).reshape(3, 128), jnp.float32)
  np.testing.assert_allclose(np.asarray(cpu_matmul.reference(x, qt)), np.asarray(x @ qt.dequantize()), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"scale_dtype": "float32"}, {"scale_dtype": "bfloat16"},
                                     {"symmetric": True}, {"group_size": 64}, {"group_size": 128},
                                     {"bits": 8}, {"bits": 8, "symmetric": True, "group_size": 64},
                                     {"n_in": 512, "n_out": 1040}])  # wide: two halves, one on another thread
def test_cpu_kernel_matches_its_reference(options):
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here (needs a C++ compiler and AVX512-VNNI)")
  options = {"n_in": 256, "n_out": 96, "group_size": 32, **options}
  n_in, n_out = options.pop("n_in"), options.pop("n_out")
  qt = _int4(n_in, n_out, **options)
  assert cpu_matmul.supports(qt)
  # 6 rows: a tile of four through a shared pass over the codes, then two single rows
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, n_in)), jnp.float32)
  got = jax.jit(cpu_matmul.matmul)(x, qt)
  assert got.shape == (2, 3, n_out)
  np.testing.assert_allclose(np.asarray(got), np.asarray(cpu_matmul.reference(x, qt)), rtol=1e-5, atol=1e-5)
  # and the int8 activations cost little against the float product
  want = x @ qt.dequantize()
  assert float(jnp.abs(got - want).max()) < 0.02 * float(jnp.abs(want).max())


@pytest.mark.parametrize("options", [{"group_size": 32}, {"group_size": 8}, {"bits": 8, "group_size": 64}])
def test_a_prompts_rows_are_each_what_they_are_alone(options):
  """29 rows (three tiles of eight, one of four, one single; a wide weight, so the strips and the quantization
  are split between threads): each row's product is bit for bit the row's own, and the reference's. Groups of
  8 inputs take the quantization's scalar path, the others its 16-lane one."""
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  qt = _int4(256, 1040, **options)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(29, 256)), jnp.float32)
  got = np.asarray(jax.jit(cpu_matmul.matmul)(x, qt))
  one = jax.jit(cpu_matmul.matmul)
  for r in range(29):
    np.testing.assert_array_equal(got[r], np.asarray(one(x[r:r + 1], qt))[0])
  np.testing.assert_allclose(got, np.asarray(cpu_matmul.reference(x, qt)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"symmetric": True}, {"bits": 8, "group_size": 64}])
def test_strips_hold_the_same_weight(options):
  """The kernel's layout (16-column strips) loses nothing: it gives the QTensor back, any column of it, and the
  same products as the QTensor laid out inside the call."""
  qt = _int4(128, 80, **{"group_size": 32, **options})
  st = cpu_matmul.strips(qt)
  assert st.codes.shape == (80 // 16, qt["codes"].shape[0], 16) and st.scale.shape == (5, 128 // qt.group_size, 16)
  np.testing.assert_array_equal(np.asarray(st.qtensor().dequantize()), np.asarray(qt.dequantize()))
  index = jnp.asarray([0, 15, 16, 79, 3])
  np.testing.assert_array_equal(np.asarray(st.columns(index).dequantize()), np.asarray(qt.dequantize())[:, index])
  stacked = jax.tree.map(lambda a: jnp.stack([a, a + 1]), qt)  # leading axes (stacked layers) keep their place
  np.testing.assert_array_equal(np.asarray(cpu_matmul.strips(stacked).codes[1]), np.asarray(st.codes + 1))
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 128)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(cpu_matmul.matmul(x, st)), np.asarray(cpu_matmul.matmul(x, qt)))
  np.testing.assert_allclose(np.asarray(cpu_matmul.matmul(x, st)), np.asarray(cpu_matmul.reference(x, st)),
                             rtol=1e-5, atol=1e-5)


def test_one_call_multiplies_several_weights_as_separate_calls_do():
  """matmul_shared: weights of several widths (the call's strips split between threads across them) give what
  their own calls give; weights of another group size or `in` are not taken together."""
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  weights = [_int4(256, 48, 32, seed=1), cpu_matmul.strips(_int4(256, 1040, 32, seed=2)), _int4(256, 16, 32, seed=3)]
  x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 256)), jnp.float32)
  got = jax.jit(cpu_matmul.matmul_shared)(x, weights)
  for y, w in zip(got, weights):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(cpu_matmul.matmul(x, w)))
  assert cpu_matmul.compatible(weights)
  assert not cpu_matmul.compatible([weights[0], _int4(256, 48, 64)])
  assert not cpu_matmul.compatible([weights[0], _int4(128, 48, 32)])


def test_cpu_kernel_in_the_model_and_its_fallbacks():
  from qalora_jax import models
  from qalora_jax.models import llama

  config = models.Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=32)
  params = llama.init_params(config, jax.random.PRNGKey(0), std=0.1)
  frozen, _ = models.quantize_params(params, quant.get("int", bits=4, group_size=32))
  params, frozen = llama.unstack_blocks(params), llama.unstack_blocks(frozen)  # 2-D kernels, as when decoding
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (8, 9)), jnp.int32)
  exact = llama.apply(config, frozen, tokens)
  int8 = llama.apply(config.replace(matmul_dtype="int8"), frozen, tokens)
  # int8 activations cost this random model about 3% of its logits (one sequence alone: 2-5%)
  assert float(jnp.abs(int8 - exact).mean()) < 0.05 * float(jnp.abs(exact).mean())
  assert not cpu_matmul.shape_ok(_int4(256, 40, 32))  # out not a multiple of 16: float path
  assert not cpu_matmul.shape_ok(quant.get("int", bits=3, group_size=32).quantize(np.ones((64, 16), np.float32)))
  float_params = llama.apply(config.replace(matmul_dtype="int8"), params, tokens)  # float weights: float path
  np.testing.assert_allclose(np.asarray(float_params), np.asarray(llama.apply(config, params, tokens)), rtol=1e-6,
                             atol=1e-6)
