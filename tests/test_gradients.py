"""The hand-written backward passes (frozen-base matmul, low-rank adapter, SwiGLU's product, fused head +
softmax) against what autodiff derives from the plain formulas, and mixed-precision matmuls against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import models, nn, quant
from qalora_jax.kernels import cpu_gemm
from qalora_jax.models import layers, llama, metrics

CONFIG = models.Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_seq_len=64, tie_embeddings=True)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("kind", ["lora", "qalora"])
@pytest.mark.parametrize("base", ["float", "int4"])
def test_linear_gradients_match_autodiff_of_the_formula(kind, base):
  w = _normal(0, (48, 24), 0.2)
  kernel = w if base == "float" else quant.get("int", bits=4, group_size=16).quantize(w)
  w_ref = w if base == "float" else kernel.dequantize(jnp.float32)
  adapter = nn.init_adapter(jax.random.PRNGKey(1), kind, 48, 24, 4, alpha=8.0, group_size=16)
  adapter = nn.Adapter(adapter.a, _normal(2, adapter.b.shape, 0.1), adapter.meta)
  x = _normal(3, (2, 5, 48))
  dy = _normal(4, (2, 5, 24))

  def ours(x, kernel, a, b):
    return (nn.linear(x, {"kernel": kernel, "adapter": nn.Adapter(a, b, adapter.meta)}) * dy).sum()

  def formula(x, w, a, b):
    pooled = nn.pool_groups(x, 16) if kind == "qalora" else x
    return ((x @ w + adapter.meta.scale * (pooled @ a) @ b) * dy).sum()

  argnums = (0, 1, 2, 3) if base == "float" else (0, 2, 3)
  got = jax.grad(ours, argnums)(x, kernel, adapter.a, adapter.b)
  want = jax.grad(formula, argnums)(x, w_ref, adapter.a, adapter.b)
  _close(got, want)


def test_the_backward_pass_keeps_no_float_copy_of_a_quantized_kernel():
  qt = quant.get("int", bits=4, group_size=16).quantize(_normal(0, (48, 24)))
  x = _normal(1, (3, 48))
  y, vjp = jax.vjp(lambda x: nn.linear(x, {"kernel": qt}), x)
  (dx,) = vjp(jnp.ones_like(y))
  _close(dx, jnp.broadcast_to(qt.dequantize(jnp.float32).sum(axis=1), x.shape))
  # What the forward pass keeps for the backward pass: the packed tensor, no [48, 24] float weight.
  kept = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape")]
  assert any(leaf.dtype == jnp.uint32 for leaf in kept)
  assert not any(leaf.shape == (48, 24) for leaf in kept)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_silu_mul_gradients_match_autodiff_and_keep_only_its_inputs(dtype):
  g, u, dy = (_normal(i, (3, 5, 40), 3.0).astype(dtype) for i in range(3))  # |g| up to ~10: both tails of s

  def formula(g, u):
    return g * (1 / (1 + jnp.exp(-g))) * u

  y, vjp = jax.vjp(layers.silu_mul, g, u)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _close(y.astype(jnp.float32), formula(g, u).astype(jnp.float32), tol)
  want = jax.vjp(formula, g.astype(jnp.float32), u.astype(jnp.float32))[1](dy.astype(jnp.float32))
  _close([d.astype(jnp.float32) for d in vjp(dy)], list(want), tol)
  assert all(d.dtype == dtype for d in vjp(dy))
  kept = [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "shape")]
  assert len(kept) == 2 and all(leaf.shape == g.shape for leaf in kept)  # g and u; autodiff keeps three more


@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("vocab_first", [True, False])
@pytest.mark.parametrize("quantized", [False, True])
def test_head_nll_matches_logits_then_softmax(vocab_first, quantized, matmul_dtype):
  """Also with bfloat16 operands (the logits' products on the same rounded operands, summed in float32). A
  bfloat16 quantized table enters the vocabulary loop as such: the compiled gradient holds no float32 copy of it."""
  w = _normal(0, (97, 32) if vocab_first else (32, 97), 0.3)
  if quantized:
    w = quant.get("int", bits=4, group_size=16).quantize(w if not vocab_first else w.T)
    vocab_first = False
  x = _normal(1, (3, 7, 32))
  targets = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 7)), jnp.int32)
  g = _normal(2, (3, 7))

  def fused(x, w):
    # 21 positions: 8 + 8 + 5; 97 tokens: 40 + 40 + 17, the logsumexp accumulated over the three
    return (layers.head_nll(x, w, targets, vocab_first=vocab_first, matmul_dtype=matmul_dtype, chunk=8,
                            vocab_chunk=40) * g).sum()

  def plain(x, w):
    return (metrics.token_nll(layers.head_logits(x, w, vocab_first, matmul_dtype), targets) * g).sum()

  tol = 1e-5 if matmul_dtype is None else 8e-3  # bfloat16: the probabilities rounded apart (2^-8 relative)
  _close(fused(x, w), plain(x, w), tol)
  argnums = (0,) if quantized else (0, 1)
  _close(jax.grad(fused, argnums)(x, w), jax.grad(plain, argnums)(x, w), tol)
  if quantized and matmul_dtype == "bfloat16":
    hlo = jax.jit(jax.grad(fused)).lower(x, w).compile().as_text()
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert loops and not any("f32[32,97]" in line for line in loops)


def test_model_nll_and_its_gradients_match_the_logits_path():
  params = llama.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 13)), jnp.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]

  def fused(params):
    return llama.nll(CONFIG, params, x, y, chunk=10).mean()

  def plain(params):
    return metrics.token_nll(llama.apply(CONFIG, params, x), y).mean()

  v0, g0 = jax.value_and_grad(fused)(params)
  v1, g1 = jax.value_and_grad(plain)(params)
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  _close(g0, g1)


def test_bfloat16_matmuls_are_close_to_float32_and_train_the_same_way():
  params = llama.init_params(CONFIG, jax.random.PRNGKey(0), std=0.2)
  frozen, _ = models.quantize_params(params, quant.get("int", bits=4, group_size=16))
  adapters = nn.add_adapters(frozen, "qalora", rank=2, alpha=4.0, key=jax.random.PRNGKey(1))
  adapters = jax.tree.map(lambda a: a + 0.05, adapters)  # B != 0: the adapters matter
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 17)), jnp.int32)
  x, y = tokens[:, :-1], tokens[:, 1:]
  mixed = CONFIG.replace(matmul_dtype="bfloat16")

  def loss(adapters, config):
    return llama.nll(config, nn.combine(frozen, adapters), x, y).mean()

  v32, g32 = jax.value_and_grad(loss)(adapters, CONFIG)
  v16, g16 = jax.value_and_grad(loss)(adapters, mixed)
  assert abs(float(v16) - float(v32)) < 1e-2 * float(v32)
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    cos = float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
    assert cos > 0.99
  assert llama.apply(mixed, frozen, x).dtype == jnp.float32


def test_bad_matmul_dtype():
  with pytest.raises(ValueError, match="matmul_dtype='float16' is not supported; allowed: "
                                       "None, float32, bfloat16, int8"):
    CONFIG.replace(matmul_dtype="float16")


@pytest.mark.skipif(not cpu_gemm.available(), reason="the CPU kernels do not build here")
@pytest.mark.parametrize("remat", [False, True])
def test_qalora_folded_into_the_offsets_trains_as_the_branch(remat, monkeypatch):
  """A float32 QA-LoRA model whose linears fold their adapters into the INT4 offsets (nn.linear.folds: sizes in
  multiples of 32, 80 tokens) gives the loss and adapter gradients of the branch computed on its own (XLA's
  products, QALORA_CPU_GEMM=0), with and without remat: within 2e-4 of each gradient's largest entry. Each path
  is within 2e-5 of float64 here (measured once with a float64 model): they sum in other orders, and the
  branch's product is rounded apart from the base's. A wrong fold (a mean for the sum, s missed) is off by
  O(1)."""
  config = models.Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=32, max_seq_len=64, tie_embeddings=True, matmul_dtype="float32",
                         remat=remat)
  frozen, _ = models.quantize_params(llama.init_params(config, jax.random.PRNGKey(0), std=0.2),
                                     quant.get("int", bits=4, group_size=32))
  adapters = nn.add_adapters(frozen, "qalora", rank=2, alpha=4.0, key=jax.random.PRNGKey(1))
  adapters = jax.tree.map(lambda a: a + 0.05, adapters)  # B != 0: the adapters matter
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 41)), jnp.int32)

  def loss(adapters):
    return llama.nll(config, nn.combine(frozen, adapters), tokens[:, :-1], tokens[:, 1:]).mean()

  if not remat:  # a layer's products both ways: q/k/v as one, o, gate/up as one (narrower than NARROW), down
    assert jax.jit(jax.grad(loss)).lower(adapters).as_text().count(cpu_gemm.TARGET) == 8
  folded = jax.jit(jax.value_and_grad(loss))(adapters)
  monkeypatch.setenv("QALORA_CPU_GEMM", "0")
  branch = jax.jit(jax.value_and_grad(lambda adapters: loss(adapters)))(adapters)  # traced again
  np.testing.assert_allclose(float(folded[0]), float(branch[0]), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(folded[1]), jax.tree.leaves(branch[1])):
    assert float(jnp.abs(got - want).max()) < 2e-4 * float(jnp.abs(want).max())
