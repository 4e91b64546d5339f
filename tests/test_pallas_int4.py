"""The Pallas INT4 kernel as the model uses it: y = x W~ and dx = dy W~^T in interpret mode against float64 on
every SmolLM2-135M linear shape and an 8B-class 4096 x 14336 layer (g32/64/128), the blocks it chooses within
Triton's limits, and base_matmul's dispatch: the kernel in the CUDA lowering for few rows, exactly the old XLA
program everywhere else."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import quant
from qalora_jax.kernels import int4_matmul as pallas_int4
from qalora_jax.kernels.int4_matmul import Blocks, choose_blocks, int4_matmul
from qalora_jax.quant import QTensor
from qalora_jax.quant.qtensor import QMeta

linear = importlib.import_module("qalora_jax.nn.linear")  # the module (qalora_jax.nn exports the function)

SMOLLM2 = [(576, 576), (576, 192), (1536, 576), (576, 1536)]  # q/o, k/v, down, gate/up: [in, out]
LLAMA_1B = [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]
LLAMA_8B = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)]
TRITON_CALL = "__gpu$xla.gpu.triton"


def random_int4(n_in, n_out, group_size, seed=0, scale_dtype=np.float16) -> QTensor:
  """A valid INT4 QTensor with random codes, scales and offsets (any of them is a weight the kernel must read)."""
  rng = np.random.default_rng(seed)
  groups = -(-n_in // group_size)
  codes = rng.integers(0, 2 ** 32, size=(n_in // 8, n_out), dtype=np.uint32)
  scale = rng.uniform(0.005, 0.02, size=(groups, n_out))
  offset = -8 * scale + rng.normal(size=(groups, n_out)) * 0.002
  arrays = {"codes": jnp.asarray(codes), "scale": jnp.asarray(scale, scale_dtype),
            "offset": jnp.asarray(offset, scale_dtype)}
  return QTensor(arrays, QMeta("int", (n_in, n_out), 4, group_size, (("symmetric", False),)))


def dequantize64(qt: QTensor, rows=None, cols=None) -> np.ndarray:
  """W~[rows][:, cols] in float64, unpacked here from the words: code i in bits [4 (i % 8), +4) of word i // 8."""
  n_in, n_out = qt.shape
  rows = np.arange(n_in) if rows is None else np.asarray(rows)
  cols = np.arange(n_out) if cols is None else np.asarray(cols)
  words = np.asarray(qt["codes"])[np.ix_(rows // 8, cols)].astype(np.uint64)
  q = (words >> (4 * (rows % 8)).astype(np.uint64)[:, None]) & 0xF
  group = rows // qt.group_size
  scale = np.asarray(qt["scale"])[np.ix_(group, cols)].astype(np.float64)
  offset = np.asarray(qt["offset"])[np.ix_(group, cols)].astype(np.float64)
  return scale * q.astype(np.float64) + offset


def relative_error(got, want) -> float:
  got = np.asarray(got, np.float64)
  assert np.isfinite(got).all()
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _all_in_one_jit(calls):
  """The kernel calls [(x, qt, transpose)] in one compiled program (interpret mode compiles once, not per call)."""
  xs, qts, transposes = zip(*calls)
  run = jax.jit(lambda xs, qts: [int4_matmul(x, qt, transpose=t, interpret=True)
                                 for x, qt, t in zip(xs, qts, transposes)])
  return [np.asarray(y) for y in run([jnp.asarray(x, jnp.float32) for x in xs], list(qts))]


@pytest.mark.parametrize("n_in, n_out", SMOLLM2)
def test_smollm2_shapes_forward_and_dx_match_float64(n_in, n_out):
  rng = np.random.default_rng(n_in + n_out)
  qts = [random_int4(n_in, n_out, g, seed=g) for g in (32, 64, 128)]  # 576 = 4.5 x 128: a short last group
  xs = [rng.normal(size=(m, n_in)) for m in (1, 5, 37)]
  dys = [rng.normal(size=(m, n_out)) for m in (37, 1, 5)]
  got = _all_in_one_jit([(x, qt, False) for x, qt in zip(xs, qts)] + [(dy, qt, True) for dy, qt in zip(dys, qts)])
  for qt, x, dy, y, dx in zip(qts, xs, dys, got[:3], got[3:]):
    w = dequantize64(qt)
    assert y.shape == (len(x), n_out) and dx.shape == (len(dy), n_in)
    assert relative_error(y, x @ w) < 1e-5, (qt.group_size, "forward")
    assert relative_error(dx, dy @ w.T) < 1e-5, (qt.group_size, "dx")


def test_8b_layer_forward_and_dx_match_float64_on_sampled_tiles():
  """4096 x 14336: forward at g32 and g128, dx at g64 and g128 (each 58.7M weights in interpret mode); the
  float64 reference on a strided sample of output tiles."""
  n_in, n_out = 4096, 14336
  rng = np.random.default_rng(8)
  qts = {g: random_int4(n_in, n_out, g, seed=g) for g in (32, 64, 128)}
  cases = [(32, False), (128, False), (64, True), (128, True)]
  xs = [rng.normal(size=(5, n_out if transpose else n_in)) for _, transpose in cases]
  got = _all_in_one_jit([(x, qts[g], transpose) for x, (g, transpose) in zip(xs, cases)])
  out_cols = np.concatenate([np.arange(c, c + 64) for c in range(0, n_out, 64 * 29)])  # 8 of 224 tiles
  in_rows = np.concatenate([np.arange(r, r + 64) for r in range(0, n_in, 64 * 9)])  # 8 of 64 tiles
  for x, y, (g, transpose) in zip(xs, got, cases):
    if transpose:
      assert relative_error(y[:, in_rows], x @ dequantize64(qts[g], rows=in_rows).T) < 1e-5, (g, "dx")
    else:
      assert relative_error(y[:, out_cols], x @ dequantize64(qts[g], cols=out_cols)) < 1e-5, (g, "forward")


def test_bfloat16_operands_accumulate_in_float32():
  """bf16 x and W~ (rounded from the float32 dequantization), float32 sums over 1536 inputs, bf16 out."""
  qt = random_int4(1536, 576, 64, seed=3)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 1536)), jnp.bfloat16)
  want = (np.asarray(x, np.float64)
          @ np.asarray(jnp.asarray(dequantize64(qt), jnp.float32).astype(jnp.bfloat16), np.float64))
  got = int4_matmul(x, qt, interpret=True)
  assert got.dtype == jnp.bfloat16
  assert relative_error(got, want) < 2 ** -8  # the bf16 rounding of the output alone


def test_the_single_row_form_matches_float64():
  """block_m = 1 (products and sums, no dot) for y = x W~ and dx = dy W~^T, split-K and whole groups per step."""
  qt = random_int4(1536, 576, 32, seed=4)
  w = dequantize64(qt)
  rng = np.random.default_rng(4)
  for transpose, blocks in ((False, Blocks(1, 64, 128, 3)), (True, Blocks(1, 128, 64, 3, warps=2, stages=3))):
    x = rng.normal(size=(1, 576 if transpose else 1536))
    got = int4_matmul(jnp.asarray(x, jnp.float32), qt, transpose=transpose, blocks=blocks, interpret=True)
    assert relative_error(got, x @ (w.T if transpose else w)) < 1e-6


@pytest.mark.parametrize("n_in, n_out", SMOLLM2 + LLAMA_1B + LLAMA_8B)
def test_chosen_blocks_fit_triton_and_fill_the_grid(n_in, n_out):
  for group_size in (32, 64, 128):
    qt = random_int4(n_in, n_out, group_size)
    for transpose in (False, True):
      reduce, width = (n_out, n_in) if transpose else (n_in, n_out)
      for m in (1, 16, 37, 64, 4096):
        b = choose_blocks(m, qt, transpose=transpose)
        assert b is not None, (n_in, n_out, group_size, transpose, m)
        for size in (b.block_m, b.block_n, b.block_k):  # loaded slices: powers of two; dots: >= 16
          assert size >= 16 and size & (size - 1) == 0
        assert width % b.block_n == 0 and reduce % (b.block_k * b.splits) == 0
        in_block = b.block_n if transpose else b.block_k
        assert in_block % group_size == 0 or group_size % in_block == 0  # one scale row, or whole groups
        programs = -(-m // b.block_m) * (width // b.block_n) * b.splits
        assert programs >= min(pallas_int4.TARGET_PROGRAMS, -(-m // b.block_m) * (width // b.block_n)
                               * (reduce // b.block_k))


def test_unsupported_weights_and_bad_arguments():
  assert choose_blocks(1, quant.get("int", bits=3, group_size=32).quantize(np.ones((64, 64), np.float32))) is None
  symmetric = quant.get("int", bits=4, group_size=32, symmetric=True).quantize(np.ones((64, 64), np.float32))
  assert choose_blocks(1, symmetric) is None  # no offsets
  assert choose_blocks(1, random_int4(576, 100, 32)) is None  # 100 outputs: no tile of 16
  assert not pallas_int4.uses_kernel((1, 64), jnp.ones((64, 64)))  # float weights
  qt = random_int4(576, 576, 32)
  assert pallas_int4.uses_kernel((2, 8, 576), qt) and not pallas_int4.uses_kernel((3, 8, 576), qt)  # 16 / 24 rows
  x = jnp.ones((1, 576))
  with pytest.raises(ValueError, match=r"backend='mosaic'; choose one of \('triton', 'default'\)"):
    int4_matmul(x, qt, backend="mosaic")
  with pytest.raises(ValueError, match="x has 576 features; the weight expects out=192"):
    int4_matmul(x, random_int4(576, 192, 32), transpose=True, interpret=True)
  # blocks that do not tile fall back to x @ W~
  fallback = int4_matmul(x, qt, blocks=Blocks(16, 64, 256), interpret=True)
  np.testing.assert_allclose(np.asarray(fallback), np.asarray(x) @ dequantize64(qt), rtol=1e-5)


# base_matmul's dispatch


def _lowered(fn, *args, platform):
  """The StableHLO text of fn(*args) lowered for `platform`, traced afresh (jit's cache keeps no earlier trace:
  the dispatch reads the environment and module settings when tracing)."""
  return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_base_matmul_stages_the_kernel_for_cuda_only():
  qt = random_int4(576, 1536, 64)

  def fwd_and_dx(x, qt, dy):
    y, vjp = jax.vjp(lambda x: linear.base_matmul(x, qt), x)
    return y, vjp(dy)[0]

  for m, calls in ((1, 2), (9, 2), (16, 2), (17, 0), (512, 0)):  # forward and dx each: one kernel
    x, dy = jnp.ones((m, 576), jnp.bfloat16), jnp.ones((m, 1536), jnp.bfloat16)
    assert _lowered(fwd_and_dx, x, qt, dy, platform="cuda").count(TRITON_CALL) == calls, m
    assert "triton" not in _lowered(fwd_and_dx, x, qt, dy, platform="cpu")
  assert TRITON_CALL not in _lowered(linear.base_matmul, jnp.ones((1, 576)), jnp.ones((576, 1536)),
                                     platform="cuda")  # a float kernel: XLA's dot


def test_qalora_gpu_kernels_0_keeps_gpus_on_xla_s_path(monkeypatch):
  qt, x = random_int4(576, 192, 32), jnp.ones((1, 576), jnp.bfloat16)
  monkeypatch.setenv("QALORA_GPU_KERNELS", "0")
  assert TRITON_CALL not in _lowered(linear.base_matmul, x, qt, platform="cuda")
  monkeypatch.setenv("QALORA_GPU_KERNELS", "1")
  assert TRITON_CALL in _lowered(linear.base_matmul, x, qt, platform="cuda")


def test_base_matmul_on_cpu_is_the_dequantize_then_dot():
  """Bit for bit what x @ materialize(W) and dy @ materialize(W)^T give, in every dtype combination."""
  rng = np.random.default_rng(0)
  qt = random_int4(576, 192, 32)
  for dtype, matmul_dtype in ((jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, "bfloat16")):
    x, dy = jnp.asarray(rng.normal(size=(5, 576)), dtype), jnp.asarray(rng.normal(size=(5, 192)), dtype)
    w = linear.materialize(qt, linear.operand_dtype(matmul_dtype, dtype))
    y, vjp = jax.jit(lambda x, qt: jax.vjp(lambda x: linear.base_matmul(x, qt, matmul_dtype), x))(x, qt)
    want_y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=dtype)
    want_dx = jnp.einsum("...o,io->...i", dy.astype(w.dtype), w, preferred_element_type=dtype)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y))
    np.testing.assert_array_equal(np.asarray(vjp(dy)[0]), np.asarray(want_dx))


def test_the_decoder_runs_its_linears_through_the_kernel_when_decoding_on_cuda():
  from qalora_jax import models
  from qalora_jax.models import llama

  config = models.Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=32, dtype="bfloat16")
  int4 = quant.get("int", bits=4, group_size=32)
  frozen = jax.eval_shape(  # shapes are all that lowering needs
      lambda: models.quantize_params(llama.init_params(config, jax.random.PRNGKey(0)), int4)[0])
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  text = _lowered(lambda p, t: llama.apply(config, p, t), frozen, tokens, platform="cuda")
  # The kernels' packed-code operands: q and o [64, 64], k and v [64, 32], gate and up [64, 128], down [128, 64]
  # (a kernel of one shape is lowered once and called for each layer that has it)
  codes = {re.search(r"tensor<(\w+)xui32>", line)[1] for line in text.splitlines() if TRITON_CALL in line}
  assert codes == {"8x64", "8x32", "8x128", "16x64"}


def test_a_kernel_that_does_not_trace_leaves_xla_s_path_with_a_warning(monkeypatch):
  def broken(*args, **kwargs):
    raise NotImplementedError("no such Pallas primitive")

  monkeypatch.setattr(pallas_int4, "int4_matmul", broken)
  qt = random_int4(576, 192, 32)
  x = jnp.ones((1, 576), jnp.bfloat16)
  with pytest.warns(UserWarning, match="the Pallas INT4 kernel does not trace with jax .* no such Pallas primitive"):
    text = _lowered(linear.base_matmul, x, qt, platform="cuda")
  assert TRITON_CALL not in text
