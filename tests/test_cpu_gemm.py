"""The CPU float32 GEMM with INT4 and INT8 weights (kernels/cpu_gemm.py): y = x W~ and dx = dy W~^T against
float64, and QA-LoRA folded into its offsets (nn.linear.folded_matmul, shared_folded)."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import quant
from qalora_jax.kernels import cpu_gemm, cpu_library
from qalora_jax.models import layers, metrics
from qalora_jax.nn.adapters import Adapter, init_adapter
from qalora_jax.nn.linear import base_matmul
from qalora_jax.quant import QTensor

linear_module = importlib.import_module("qalora_jax.nn.linear")  # the package exports the function `linear`

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="the CPU kernels do not build here")


def _quantized(n_in, n_out, seed=0, **options):
  w = np.random.default_rng(seed).normal(size=(n_in, n_out)).astype(np.float32) * 0.05
  return quant.get("int", **{"bits": 4, "group_size": 32, **options}).quantize(w)


def _error(got, want):
  """Largest error over the largest entry."""
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _engine(monkeypatch, tiles):
  """The AVX512 kernel, or AMX's tiles (skipped where this CPU has none)."""
  monkeypatch.setenv("QALORA_CPU_AMX", "1" if tiles else "0")
  if tiles and not cpu_library.amx():
    pytest.skip("no AMX tiles here")
  assert cpu_gemm.engine(jnp.float32) == ("amx" if tiles else "avx512")


# rows: tiles of 14 and a partial one, blocks of 32 (AMX); out: panels of 32 and partial ones (forward); K in blocks
# of at most 256 (AVX512); K above 2048 runs with AVX512 FMAs on AMX machines too
@pytest.mark.parametrize("tiles", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("rows, n_in, n_out, options", [
    (100, 64, 40, {"group_size": 16}),
    (512, 576, 192, {}),
    (77, 192, 600, {"group_size": 64, "scale_dtype": "float32"}),
    (300, 1536, 96, {"group_size": 128, "symmetric": True}),
    (64, 32, 1100, {"scale_dtype": "bfloat16"}),
    (130, 576, 200, {"bits": 8}),
    (1100, 64, 96, {}),  # rows in blocks (518 with AVX512, 512 on the tiles), each packed in turn
    (70, 64, 64, {"bits": 8, "symmetric": True, "group_size": 64}),
    (96, 2560, 64, {}),  # K above the tiles' limit
    (70, 64, 2000, {}),  # the input gradient's K under the limit and not a multiple of 32; a partial panel
    (70, 1984, 40, {"bits": 8}),  # K a multiple of 32 under the limit, a partial column panel
])
def test_products_match_float64(rows, n_in, n_out, options, tiles, monkeypatch):
  _engine(monkeypatch, tiles)
  qt = _quantized(n_in, n_out, **options)
  assert cpu_gemm.supports(qt, rows, jnp.float32)
  w = np.asarray(qt.dequantize(jnp.float32), np.float64)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(rows, n_in)).astype(np.float32)
  dy = rng.normal(size=(rows, n_out)).astype(np.float32)
  y = jax.jit(lambda x: cpu_gemm.matmul(x, qt))(x)  # a new function: traced with the engine set above
  dx = jax.jit(lambda dy: cpu_gemm.matmul(dy, qt, True))(dy)
  # float32 products summed in float32: within a few units of float32 rounding over the sum's length, as XLA's own
  xla_y, xla_dx = x @ qt.dequantize(jnp.float32), dy @ qt.dequantize(jnp.float32).T
  for got, xla, want, k in [(y, xla_y, x @ w, n_in), (dx, xla_dx, dy @ w.T, n_out)]:
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _error(got, want) < max(4 * _error(xla, want), 2e-6 * np.sqrt(k))


def test_leading_axes():
  qt = _quantized(64, 96)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 20, 64)), jnp.float32)
  np.testing.assert_allclose(np.asarray(cpu_gemm.matmul(x, qt)),
                             np.asarray(cpu_gemm.matmul(x.reshape(80, 64), qt)).reshape(4, 20, 96), rtol=0, atol=0)


def test_what_it_takes():
  assert not cpu_gemm.supports(_quantized(64, 96), 63, jnp.float32)  # too few rows: decoding stays on XLA's products
  assert not cpu_gemm.supports(_quantized(64, 96), 64, jnp.bfloat16)
  assert not cpu_gemm.supports(_quantized(48, 96, group_size=16), 64, jnp.float32)  # in not a multiple of 32
  assert not cpu_gemm.supports(_quantized(64, 96, group_size=8), 64, jnp.float32)
  assert not cpu_gemm.supports(_quantized(64, 96, bits=3), 64, jnp.float32)
  assert cpu_gemm.supports(_quantized(64, 96, bits=8), 64, jnp.float32)
  assert not cpu_gemm.supports(np.ones((64, 96), np.float32), 64, jnp.float32)


def test_base_matmul_runs_it_both_ways(monkeypatch):
  """A float32 training product with a frozen INT4 weight runs the kernel forward and backward, with the
  gradient XLA's dequantize-then-dot gives."""
  qt = _quantized(128, 96)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 40, 128)), jnp.float32)
  loss = lambda x: jnp.sum(jnp.sin(base_matmul(x, qt, "float32")))
  hlo = jax.jit(jax.value_and_grad(loss)).lower(x).as_text()
  assert hlo.count(cpu_gemm.TARGET) == 2
  value, grad = jax.jit(jax.value_and_grad(loss))(x)
  monkeypatch.setenv("QALORA_CPU_GEMM", "0")
  xla_loss = lambda x: jnp.sum(jnp.sin(base_matmul(x, qt, "float32")))  # a new function: traced again
  assert cpu_gemm.TARGET not in jax.jit(jax.value_and_grad(xla_loss)).lower(x).as_text()
  want_value, want_grad = jax.jit(jax.value_and_grad(xla_loss))(x)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-5)


def test_the_head_runs_it_on_a_quantized_table():
  """The fused head's float32 products with an 8-bit [D, V] table (the tied embedding as stored) run the kernel,
  logits and gradient, with the loss and gradient of the logits-then-softmax path."""
  table = _quantized(64, 300, bits=8)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 50, 64)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 300, (2, 50)), jnp.int32)

  def fused(x):  # 100 positions: 64 + 36; 300 tokens: 128 + 128 + 44
    return layers.head_nll(x, table, targets, vocab_first=False, chunk=64, vocab_chunk=128).mean()

  def plain(x):
    return metrics.token_nll(layers.head_logits(x, table, False), targets).mean()

  assert jax.jit(jax.grad(fused)).lower(x).as_text().count(cpu_gemm.TARGET) >= 4  # logits and gradient, twice
  np.testing.assert_allclose(float(fused(x)), float(plain(x)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(fused)(x)), np.asarray(jax.grad(plain)(x)), rtol=1e-4, atol=1e-6)


def _qalora_case(n_in=192, n_out=96, rows=100, group_size=32, seed=5):
  qt = _quantized(n_in, n_out, group_size=group_size)
  rng = np.random.default_rng(seed)
  adapter = init_adapter(jax.random.PRNGKey(seed), "qalora", n_in, n_out, 8, alpha=16, group_size=group_size)
  adapter = Adapter(adapter.a, jnp.asarray(rng.normal(size=adapter.b.shape) * 0.1, jnp.float32), adapter.meta)
  x = jnp.asarray(rng.normal(size=(2, rows // 2, n_in)), jnp.float32)
  return qt, adapter, x


def test_qalora_folded_into_the_offsets_matches_float64():
  """QA-LoRA on float32 operands runs as one product with offsets + s A B (`folded_matmul`): output and the
  gradients of x, A and B against the branch written out in float64,

    y = x W~ + s pool(x) A B,  dx = dy W~^T + s (dy B^T A^T) P^T,  dA = s pool(x)^T dy B^T,  dB = s (pool(x) A)^T dy.
  """
  qt, adapter, x = _qalora_case()
  assert linear_module.folds(x, qt, adapter, None, "float32")

  def loss(x, a, b):
    y = linear_module.linear(x, {"kernel": qt, "adapter": Adapter(a, b, adapter.meta)}, matmul_dtype="float32")
    return jnp.sum(y * dy), y

  dy = jnp.asarray(np.random.default_rng(6).normal(size=x.shape[:-1] + (96,)), jnp.float32)
  grad = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))
  hlo = grad.lower(x, adapter.a, adapter.b).as_text()
  assert hlo.count(cpu_gemm.TARGET) == 2  # x W' and dy W'^T: no other product with x or dy of [tokens, in or out]
  (gx, ga, gb), y = grad(x, adapter.a, adapter.b)

  s, w = adapter.meta.scale, np.asarray(qt.dequantize(jnp.float32), np.float64)
  a, b = np.asarray(adapter.a, np.float64), np.asarray(adapter.b, np.float64)
  x64, dy64 = np.asarray(x, np.float64).reshape(-1, 192), np.asarray(dy, np.float64).reshape(-1, 96)
  pool = np.kron(np.eye(6), np.ones((32, 1)))  # P [in, groups]: P_il = [i in group l]
  px = x64 @ pool
  want = {"y": x64 @ w + s * px @ a @ b, "dx": dy64 @ w.T + s * dy64 @ b.T @ a.T @ pool.T,
          "da": s * px.T @ dy64 @ b.T, "db": s * (px @ a).T @ dy64}
  got = {"y": y.reshape(-1, 96), "dx": gx.reshape(-1, 192), "da": ga, "db": gb}
  for name in want:
    assert _error(got[name], want[name]) < 2e-6, name


def test_qalora_folds_only_where_it_is_exact():
  qt, adapter, x = _qalora_case()
  assert not linear_module.folds(x, qt, adapter, None, "bfloat16")  # rounding s A B into bfloat16 offsets
  assert not linear_module.folds(x.astype(jnp.bfloat16), qt, adapter, None, None)
  assert not linear_module.folds(x[:, :10], qt, adapter, None, "float32")  # too few rows for the GEMM
  with_dropout = Adapter(adapter.a, adapter.b, dataclasses.replace(adapter.meta, dropout=0.1))
  assert linear_module.folds(x, qt, with_dropout, None, "float32")  # evaluation: no dropout key
  assert not linear_module.folds(x, qt, with_dropout, jax.random.PRNGKey(0), "float32")
  coarser = init_adapter(jax.random.PRNGKey(0), "qalora", 192, 96, 8, alpha=16, group_size=64)
  assert not linear_module.folds(x, qt, coarser, None, "float32")  # pooling other groups than the quantizer's
  lora = init_adapter(jax.random.PRNGKey(0), "lora", 192, 96, 8, alpha=16)
  assert not linear_module.folds(x, qt, lora, None, "float32")
  nf4 = quant.get("nf4", block_size=32).quantize(np.asarray(qt.dequantize(jnp.float32)))  # no per-group offsets
  assert not linear_module.folds(x, nf4, adapter, None, "float32")


def test_linears_reading_one_input_share_a_product_where_one_is_narrow():
  """q/k/v-like linears (one narrower than cpu_gemm.NARROW) run as one folded product, with the outputs and
  gradients of each folded on its own; gate/up-like ones (none narrow) stay apart."""
  narrow, wide = cpu_gemm.NARROW // 2, cpu_gemm.NARROW
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(70, 64)), jnp.float32)
  ps = []
  for i, n_out in enumerate([wide, narrow, narrow]):
    qt = _quantized(64, n_out, seed=i)
    adapter = init_adapter(jax.random.PRNGKey(i), "qalora", 64, n_out, 4, alpha=8, group_size=32)
    adapter = Adapter(adapter.a, jnp.asarray(rng.normal(size=adapter.b.shape) * 0.1, jnp.float32), adapter.meta)
    ps.append({"kernel": qt, "adapter": adapter})
  assert linear_module.shared_folded(x, ps[:1] * 2, [None] * 2, "float32") is None  # none narrow
  other_groups = _quantized(64, narrow, group_size=64)
  assert not QTensor.columns_alike([ps[1]["kernel"], other_groups])
  with pytest.raises(ValueError, match="concat_columns needs column-wise QTensors alike"):
    QTensor.concat_columns([ps[1]["kernel"], other_groups])
  assert linear_module.shared_folded(x, ps, [None] * 3, "bfloat16") is None  # does not fold

  def loss(x, adapters, shared):
    ps_now = [{"kernel": p["kernel"], "adapter": a} for p, a in zip(ps, adapters)]
    ys = (linear_module.shared_folded(x, ps_now, [None] * 3, "float32") if shared
          else [linear_module.linear(x, p, matmul_dtype="float32") for p in ps_now])
    return sum(jnp.sum(jnp.sin(y)) for y in ys)

  adapters = [p["adapter"] for p in ps]
  assert jax.jit(jax.grad(loss), static_argnums=2).lower(x, adapters, True).as_text().count(cpu_gemm.TARGET) == 2
  shared = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(x, adapters, True)
  apart = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(x, adapters, False)
  np.testing.assert_allclose(float(shared[0]), float(apart[0]), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(shared[1]), jax.tree.leaves(apart[1])):
    assert float(jnp.abs(got - want).max()) < 1e-5 * float(jnp.abs(want).max())
