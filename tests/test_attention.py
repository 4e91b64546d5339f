"""Blocked attention (online softmax, own backward pass) against the dense form, and the model using it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models_testing import equations
from qalora_jax import models
from qalora_jax.models import attention as attn
from qalora_jax.models import llama


@pytest.fixture(scope="module")
def tiny():
  return models.tiny_model(max_seq_len=512)


def _inputs(rng, b, t, s, heads, kv_heads, d, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(b, t, heads, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kv_heads, d)), dtype)
  return q, k, v


@pytest.mark.parametrize("t,heads,kv_heads,block,window,left_pad", [
    (300, 6, 2, 64, None, 7),     # ragged last block, grouped queries, left padding
    (256, 4, 4, 64, 40, 0),       # sliding window: blocks outside it skipped
    (130, 3, 1, 32, None, 0),     # one KV head for all query heads
])
def test_blocked_equals_dense_forward_and_gradients(t, heads, kv_heads, block, window, left_pad):
  rng = np.random.default_rng(t)
  q, k, v = _inputs(rng, 2, t, t, heads, kv_heads, 16)
  key_mask = jnp.asarray(np.arange(t)[None, :] >= np.array([[left_pad], [0]]))
  mask = attn.Mask(key_mask, 0, window)
  # Rows with no visible key (left padding) are padding: compared nowhere, and given no gradient.
  valid = key_mask[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(valid, fn(q, k, v), 0.0) * weights)

  dense = lambda q, k, v: attn.dense_attention(q, k, v, mask)
  blocked = lambda q, k, v: attn.blocked_attention(q, k, v, key_mask, 0, window, block)
  np.testing.assert_allclose(np.where(valid, blocked(q, k, v), 0), np.where(valid, dense(q, k, v), 0), atol=2e-6)
  for got, want in zip(jax.grad(loss(blocked), (0, 1, 2))(q, k, v), jax.grad(loss(dense), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_blocked_attention_in_bfloat16_stays_within_bfloat16_rounding_of_float32():
  rng = np.random.default_rng(1)
  q, k, v = _inputs(rng, 1, 512, 512, 6, 2, 32)
  key_mask = jnp.ones((1, 512), bool)
  want = attn.dense_attention(q, k, v, attn.Mask(key_mask))
  got = attn.blocked_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), key_mask, 0, None, 128)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_no_pass_holds_a_sequence_by_sequence_array():
  """The invariant the blocked form exists for: forward and backward hold no [t, S]-sized intermediate."""
  t, block = 1024, 128
  q, k, v = _inputs(np.random.default_rng(2), 1, t, t, 4, 2, 16)
  key_mask = jnp.ones((1, t), bool)
  loss = lambda q, k, v: jnp.sum(attn.blocked_attention(q, k, v, key_mask, 0, None, block) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v)
  largest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars)
  assert largest < t * t, largest
  dense_loss = lambda q, k, v: jnp.sum(attn.dense_attention(q, k, v, attn.Mask(key_mask)) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(dense_loss, (0, 1, 2)))(q, k, v)
  assert max(int(np.prod(var.aval.shape)) for eqn in jaxpr.eqns for var in eqn.outvars) >= t * t


def test_causal_skipping_visits_the_lower_triangle_of_blocks():
  mask = attn.Mask(jnp.ones((1, 1024), bool))
  spans = attn._spans(1024, 256)
  visited = [(i, j) for i, (qs, qe) in enumerate(spans) for j, (ks, ke) in enumerate(spans)
             if mask.visible(qs, qe, ks, ke)]
  assert visited == [(i, j) for i in range(4) for j in range(i + 1)]
  windowed = attn.Mask(jnp.ones((1, 1024), bool), 0, 100)
  assert not windowed.visible(512, 768, 0, 256)       # every query is > 256 positions past every key
  assert windowed.visible(256, 512, 0, 256)           # query 256 sees keys 157..256


@pytest.mark.parametrize("form", ["cpu kernel", "blocked"])
def test_model_logits_and_cached_prefill_equal_the_dense_attention(tiny, monkeypatch, form):
  """A 300-token pass runs the CPU sequence kernel where it builds, or blocked (three 128-blocks); replacing the
  attention by the dense form changes nothing, with or without a KV cache."""
  from qalora_jax.kernels import cpu_attention

  config, params = tiny.config, tiny.params
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 300)), jnp.int32)
  monkeypatch.setattr(attn, "BLOCK", 128)
  if form == "blocked":
    monkeypatch.setattr(cpu_attention, "supports_sequence", lambda q, k, v: False)
  elif not cpu_attention.supports_sequence(*(jnp.zeros((1, 1, 1, config.head_dim)),) * 3):
    pytest.skip("the CPU kernels do not build here")
  blocked = models.apply(config, params, tokens)
  cache = llama.init_cache(config, 2, 320)
  key_mask = jnp.zeros((2, 320), bool).at[:, :300].set(True)
  cached, _ = llama.forward(config, params, tokens, llama.default_positions(tokens >= 0), key_mask, cache, 0)
  monkeypatch.setattr(llama, "attention", lambda q, k, v, mask, **_: attn.dense_attention(q, k, v, mask))
  dense = models.apply(config, params, tokens)
  scale = float(jnp.max(jnp.abs(dense)))
  np.testing.assert_allclose(blocked, dense, atol=1e-5 * scale)
  np.testing.assert_allclose(cached, dense, atol=1e-5 * scale)


def test_a_rematerialised_block_does_not_run_the_attention_again():
  """With the names REMAT_SAVED kept, the gradient of a checkpointed block has the exps of one forward and one
  backward attention pass, not two forward passes and a backward one."""
  q, k, v = _inputs(np.random.default_rng(4), 1, 512, 512, 4, 2, 16)
  key_mask = jnp.ones((1, 512), bool)

  def block(q, k, v):
    return jnp.sum(jnp.sin(attn.blocked_attention(2 * q, 2 * k, 2 * v, key_mask, 0, None, 128)))

  def exps(fn):
    return sum(e.primitive.name == "exp" for e in equations(jax.make_jaxpr(fn)(q, k, v).jaxpr))

  grad = lambda policy: jax.grad(jax.checkpoint(block, policy=policy), (0, 1, 2))  # noqa: E731
  saved = exps(grad(jax.checkpoint_policies.save_only_these_names(*attn.REMAT_SAVED)))
  assert exps(block) > 0 and exps(grad(None)) - saved == exps(block)


@pytest.mark.parametrize("index,window", [(0, None), (9, None), (23, 6)])
def test_the_cpu_decoding_attention_equals_the_dense_form(index, window):
  """With a traced index (decoding with a cache), `attention` reads the cache in the CPU kernel; it equals the
  dense form, rows that see no key at all (here batch row 1) included."""
  from qalora_jax.kernels import cpu_attention

  rng = np.random.default_rng(3)
  q, k, v = _inputs(rng, 2, 2, 24, 6, 2, 16)
  key_mask = jnp.asarray(rng.random((2, 24)) > 0.25).at[1].set(False)
  if not cpu_attention.supports(q, k, v):
    pytest.skip("the CPU kernels do not build here")
  got = jax.jit(lambda i: attn.attention(q, k, v, attn.Mask(key_mask, i, window)))(jnp.int32(index))
  want = attn.dense_attention(q, k, v, attn.Mask(key_mask, index, window))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert "qalora_cpu_attention" in jax.jit(lambda i: attn.attention(q, k, v, attn.Mask(key_mask, i))).lower(
      jnp.int32(index)).as_text()


SEQUENCE_CASES = [
    (2, 13, 13, 4, 2, 16, 0, None, 0),     # t * group not a multiple of the kernel's 12-row tile
    (1, 300, 300, 9, 3, 64, 0, 50, 0),     # SmolLM2's heads; sliding window (odd first keys); both threads
    (2, 20, 40, 4, 2, 32, 7, None, 3),     # a prompt at slot 7 of a 40-slot cache, left padding
    (1, 37, 37, 6, 3, 80, 0, None, 5),     # a head size of five 16-lane registers (64 + 16); an odd key count
    (4, 128, 128, 9, 3, 64, 0, None, 0),   # the benchmark's batch
    (1, 70, 70, 4, 1, 128, 0, None, 0),    # LLaMA's head size: four AMX tiles of d; one KV head for four
]


@pytest.mark.parametrize("b,t,s,heads,kv_heads,d,index,window,left_pad", SEQUENCE_CASES)
def test_the_cpu_sequence_attention_equals_the_dense_form_forward_and_gradients(b, t, s, heads, kv_heads, d, index,
                                                                                 window, left_pad):
  """With a static index, `attention` runs the training kernel where it builds: its output and its gradients
  with respect to q, k and v equal the dense form's within float32 rounding. Rows that see no key (left padding)
  get zeros and pass no gradient on."""
  from qalora_jax.kernels import cpu_attention

  rng = np.random.default_rng(t + d)
  q, k, v = _inputs(rng, b, t, s, heads, kv_heads, d)
  if not cpu_attention.supports_sequence(q, k, v):
    pytest.skip("the CPU kernels do not build here")
  key_mask = jnp.asarray(np.arange(s)[None, :] >= np.array([[left_pad]] + [[0]] * (b - 1)))
  mask = attn.Mask(key_mask, index, window)
  seen = mask.dense(t).any(-1)[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(seen, fn(q, k, v), 0.0) * weights)

  kernel = lambda q, k, v: attn.attention(q, k, v, mask)  # noqa: E731
  dense = lambda q, k, v: attn.dense_attention(q, k, v, mask)  # noqa: E731
  assert "qalora_cpu_attention_fwd" in jax.jit(kernel).lower(q, k, v).as_text()
  got = jax.jit(kernel)(q, k, v)
  np.testing.assert_allclose(np.where(seen, got, 0), np.where(seen, dense(q, k, v), 0), atol=2e-6)
  np.testing.assert_array_equal(np.where(seen, 0, got), 0)
  grads = jax.jit(jax.grad(loss(kernel), (0, 1, 2)))(q, k, v)
  for got, want in zip(grads, jax.grad(loss(dense), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("products", ["vdpbf16ps", "amx"])
@pytest.mark.parametrize("b,t,s,heads,kv_heads,d,index,window,left_pad", SEQUENCE_CASES)
def test_the_cpu_sequence_attention_with_bfloat16_operands_rounds_them_and_keeps_the_dense_result(
    b, t, s, heads, kv_heads, d, index, window, left_pad, products, monkeypatch):
  """operand_dtype bfloat16, on either kind of products: the kernel rounds q, k, v itself (rounding them first
  changes no bit of the output or the gradients), and its output and gradients equal the dense form's on the
  rounded q, k, v within the rounding of the probabilities and ds to bfloat16 (8 significant bits: 2^-8 relative
  a term). AMX tiles take heads whose size is a multiple of 32; the others keep vdpbf16ps."""
  from qalora_jax.kernels import cpu_attention, cpu_library

  rng = np.random.default_rng(t + d)
  q, k, v = _inputs(rng, b, t, s, heads, kv_heads, d)
  if not (cpu_attention.supports_sequence(q, k, v) and cpu_attention.bf16_products()):
    pytest.skip("the CPU kernels do not build here, or the CPU has no AVX512-BF16")
  monkeypatch.setenv("QALORA_CPU_AMX", "1" if products == "amx" else "0")
  if products == "amx" and not cpu_library.amx():
    pytest.skip("no AMX tiles here")
  attribute = 2 if products == "amx" and d % 32 == 0 else 1
  key_mask = jnp.asarray(np.arange(s)[None, :] >= np.array([[left_pad]] + [[0]] * (b - 1)))
  mask = attn.Mask(key_mask, index, window)
  seen = mask.dense(t).any(-1)[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)]

  def value_and_grads(fn):
    loss = lambda q, k, v: jnp.sum(jnp.where(seen, fn(q, k, v), 0.0) * weights)  # noqa: E731
    return jax.jit(lambda *x: (fn(*x), jax.grad(loss, (0, 1, 2))(*x)))

  kernel = value_and_grads(lambda q, k, v: attn.attention(q, k, v, mask, operand_dtype=jnp.bfloat16))
  text = kernel.lower(q, k, v).as_text()
  assert "qalora_cpu_attention_fwd" in text and "qalora_cpu_attention_bwd" in text  # the kernel, not a fallback
  assert text.count(f"bf16 = {attribute} : i64") == text.count("custom_call @qalora_cpu_attention")  # every call
  got, got_grads = kernel(q, k, v)
  again, again_grads = kernel(*rounded)
  for x, y in zip((got, *got_grads), (again, *again_grads)):
    np.testing.assert_array_equal(x, y)
  want, want_grads = value_and_grads(lambda q, k, v: attn.dense_attention(q, k, v, mask))(*rounded)
  np.testing.assert_allclose(np.where(seen, got, 0), np.where(seen, want, 0), atol=8e-3 * float(jnp.max(abs(want))))
  for x, y in zip(got_grads, want_grads):
    np.testing.assert_allclose(x, y, atol=1.5e-2 * float(jnp.max(jnp.abs(y))))


@pytest.mark.parametrize("b,t,s,heads,kv_heads,d,index,window,left_pad", [c for c in SEQUENCE_CASES if c[5] % 32 == 0])
def test_the_amx_products_equal_the_vdpbf16ps_products(b, t, s, heads, kv_heads, d, index, window, left_pad,
                                                        monkeypatch):
  """Both bfloat16 paths multiply the same bfloat16 operands (q, k, v, dout, p, ds) exactly and sum in float32;
  they differ only in the order of the sums, and where that order tips an entry of p or ds to the other bfloat16
  neighbour (2^-8 relative, one term of a sum). Nearly every entry agrees within 1e-4 of the largest, and none
  is further apart than a quarter of the tolerance against the dense form."""
  from qalora_jax.kernels import cpu_attention, cpu_library

  rng = np.random.default_rng(t + d)
  q, k, v = _inputs(rng, b, t, s, heads, kv_heads, d)
  if not (cpu_attention.supports_sequence(q, k, v) and cpu_library.amx()):
    pytest.skip("no AMX tiles here")
  key_mask = jnp.asarray(np.arange(s)[None, :] >= np.array([[left_pad]] + [[0]] * (b - 1)))
  mask = attn.Mask(key_mask, index, window)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def value_and_grads():  # traced anew, so that it reads QALORA_CPU_AMX
    fn = lambda q, k, v: attn.attention(q, k, v, mask, operand_dtype=jnp.bfloat16)  # noqa: E731
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * weights)  # noqa: E731
    return jax.jit(lambda *x: (fn(*x), *jax.grad(loss, (0, 1, 2))(*x)))(q, k, v)

  amx = value_and_grads()
  monkeypatch.setenv("QALORA_CPU_AMX", "0")
  for x, y in zip(amx, value_and_grads()):
    scale = float(jnp.max(jnp.abs(y)))
    np.testing.assert_allclose(x, y, atol=2e-3 * scale)
    assert np.mean(np.abs(np.asarray(x - y)) > 1e-4 * scale) < 1e-3


def test_a_rematerialised_block_keeps_the_cpu_kernels_output():
  """The sequence kernel names its output and log-sum-exp as REMAT_SAVED: the gradient of a checkpointed block
  runs its forward pass once, not again in the backward pass."""
  from qalora_jax.kernels import cpu_attention

  q, k, v = _inputs(np.random.default_rng(5), 1, 64, 64, 4, 2, 16)
  if not cpu_attention.supports_sequence(q, k, v):
    pytest.skip("the CPU kernels do not build here")
  mask = attn.Mask(jnp.ones((1, 64), bool))
  block = lambda q, k, v: jnp.sum(jnp.sin(attn.attention(2 * q, 2 * k, 2 * v, mask)))  # noqa: E731

  def calls(policy):
    text = jax.jit(jax.value_and_grad(jax.checkpoint(block, policy=policy), (0, 1, 2))).lower(q, k, v).as_text()
    return text.count("qalora_cpu_attention_fwd"), text.count("qalora_cpu_attention_bwd")

  assert calls(jax.checkpoint_policies.save_only_these_names(*attn.REMAT_SAVED)) == (1, 1)
  assert calls(None) == (2, 1)
