"""GPTQ: the per-layer solver against an independent float64 reference, its output error against round to
nearest, bad input, and the block-by-block calibration driver on a tiny random model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qalora_jax import calibration, models, quant
from qalora_jax.quant import gptq


def reference_gptq(w, h, bits, group_size, damp=0.01, order=None, static=False):
  """GPTQ as the paper writes it, in float64 on the [out, in] weight, one input column at a time with every
  later column updated at once (no blocks). Returns (codes [in, out], scale [n_groups, out], zero)."""
  wt = np.array(w, np.float64).T.copy()  # [out, in]
  h = np.array(h, np.float64).copy()
  n_out, n_in = wt.shape
  maxq = 2**bits - 1
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  wt[:, dead] = 0
  n_groups = -(-n_in // group_size)
  scale, zero = np.zeros((n_groups, n_out)), np.zeros((n_groups, n_out))

  def set_grid(g, cols):
    lo, hi = np.minimum(cols.min(axis=1), 0), np.maximum(cols.max(axis=1), 0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
    scale[g] = (hi - lo) / maxq
    zero[g] = np.round(-lo / scale[g])

  if static:
    for g in range(n_groups):
      set_grid(g, wt[:, g * group_size:(g + 1) * group_size])
  order = np.arange(n_in) if order is None else np.asarray(order)
  wt, h = wt[:, order], h[np.ix_(order, order)]
  h += damp * np.mean(np.diag(h)) * np.eye(n_in)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
  codes = np.zeros((n_out, n_in))
  for i in range(n_in):
    g = order[i] // group_size if static else i // group_size
    if not static and i % group_size == 0:
      set_grid(g, wt[:, i:i + group_size])
    q = np.clip(np.round(wt[:, i] / scale[g]) + zero[g], 0, maxq)
    err = (wt[:, i] - scale[g] * (q - zero[g])) / u[i, i]
    wt[:, i + 1:] -= np.outer(err, u[i, i + 1:])
    codes[:, i] = q
  out = np.zeros_like(codes)
  out[:, order] = codes
  return out.T, scale, zero


def correlated_inputs(n, n_in, seed=0):
  """Inputs with strongly correlated features, like a transformer's activations: a few shared directions
  (x = z A, A [n_in / 4, n_in]) plus small independent noise, features on different scales."""
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=(n, n_in // 4)) @ rng.normal(size=(n_in // 4, n_in))
  x = (shared + 0.3 * rng.normal(size=(n, n_in))) * rng.uniform(0.2, 3.0, size=n_in)
  return x.astype(np.float32)


def hessian(x):
  return (2.0 / len(x)) * x.T.astype(np.float64) @ x.astype(np.float64)


def codes_of(qt):
  return np.asarray(quant.unpack(qt["codes"], qt.bits, qt.shape[0]))


@pytest.mark.parametrize("bits, group_size, n_in, block_size", [
    (4, 32, 128, 128),
    (3, 32, 80, 128),  # short last group (80 = 2 x 32 + 16)
    (2, 16, 96, 32),  # several blocks: lazy updates between them
    (4, 8, 64, 20),  # block not a multiple of the group: aligned down to 16
])
def test_solver_matches_float64_reference(bits, group_size, n_in, block_size):
  x = correlated_inputs(512, n_in)
  w = np.random.default_rng(1).normal(size=(n_in, 24)).astype(np.float32) * 0.05
  h = hessian(x)
  q = quant.get("gptq", bits=bits, group_size=group_size, block_size=block_size, scale_dtype="float32")
  qt = q.quantize_with_hessian(w, h.astype(np.float32))
  ref_codes, ref_scale, ref_zero = reference_gptq(w, h, bits, group_size)
  codes = codes_of(qt)
  assert np.mean(codes == ref_codes) > 0.97  # float32 vs float64: a rare tie flips, and its error moves on
  np.testing.assert_allclose(np.asarray(qt["scale"]), ref_scale, rtol=2e-2, atol=1e-6)
  ours = float(gptq.output_relative_error(w, qt.dequantize(), h.astype(np.float32)))
  ref_w = ((ref_codes.T - np.repeat(ref_zero, group_size, axis=0)[:n_in].T) *
           np.repeat(ref_scale, group_size, axis=0)[:n_in].T).T
  theirs = float(gptq.output_relative_error(w, ref_w.astype(np.float32), h.astype(np.float32)))
  assert ours == pytest.approx(theirs, rel=0.05)


def test_act_order_static_groups_matches_reference():
  x = correlated_inputs(512, 64, seed=3)
  w = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32) * 0.05
  h = hessian(x)
  q = quant.get("gptq", bits=4, group_size=16, act_order=True, static_groups=True, scale_dtype="float32")
  qt = q.quantize_with_hessian(w, h.astype(np.float32))
  order = np.argsort(-np.diag(h), kind="stable")
  ref_codes, ref_scale, _ = reference_gptq(w, h, 4, 16, order=order, static=True)
  assert np.mean(codes_of(qt) == ref_codes) > 0.97
  np.testing.assert_allclose(np.asarray(qt["scale"]), ref_scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (2, 16)])
def test_output_error_below_round_to_nearest(bits, group_size):
  x = correlated_inputs(1024, 128, seed=bits)
  w = np.random.default_rng(bits).standard_t(5, size=(128, 48)).astype(np.float32) * 0.05
  h = hessian(x).astype(np.float32)
  q = quant.get("gptq", bits=bits, group_size=group_size)
  err = lambda qt: float(gptq.output_relative_error(w, qt.dequantize(), h))  # noqa: E731
  ours = err(q.quantize_with_hessian(w, h))
  assert ours < 0.8 * err(q.quantize(w))  # GPTQ's own grid, H = I: round to nearest
  assert ours < 0.8 * err(quant.get("int", bits=bits, group_size=group_size).quantize(w))


def test_identity_hessian_is_round_to_nearest_on_the_gptq_grid():
  w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
  qt = quant.get("gptq", bits=3, group_size=16, scale_dtype="float32").quantize(w)
  ref_codes, ref_scale, ref_zero = reference_gptq(w, np.eye(64) * 1e-3, 3, 16)
  np.testing.assert_array_equal(codes_of(qt), ref_codes)
  zero = np.round(np.asarray(gptq.offset_to_zero(qt["scale"], qt["offset"])))
  np.testing.assert_array_equal(zero, ref_zero)


def test_output_is_the_int_format_with_integer_zero_offsets():
  w = np.random.default_rng(0).normal(size=(72, 16)).astype(np.float32)
  qt = quant.get("gptq", bits=4, group_size=32).quantize_with_hessian(w, hessian(correlated_inputs(256, 72)))
  assert qt.format == "int" and quant.has_group_offset(qt)
  assert qt["scale"].shape == (3, 16) and qt["offset"].dtype == jnp.float16  # 72 = 32 + 32 + 8
  zero = np.round(np.asarray(gptq.offset_to_zero(qt["scale"], qt["offset"])))
  assert ((zero >= 0) & (zero <= 15)).all()
  np.testing.assert_array_equal(np.asarray(gptq.zero_to_offset(qt["scale"], zero, jnp.float16)),
                                np.asarray(qt["offset"]))


def test_dead_inputs_are_zeroed():
  x = correlated_inputs(256, 32)
  x[:, 5] = 0
  w = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
  qt = quant.get("gptq", bits=8, group_size=32).quantize_with_hessian(w, hessian(x).astype(np.float32))
  assert np.abs(np.asarray(qt.dequantize())[5]).max() < 1e-2  # zeroed before quantization (to a grid step)


def test_bad_options_and_inputs_name_the_parameter():
  with pytest.raises(ValueError, match="act_order=True without static_groups=True.*allowed: act_order=False"):
    quant.get("gptq", act_order=True)
  with pytest.raises(ValueError, match=r"bits=5 is not supported; allowed: 2, 3, 4, 8"):
    quant.get("gptq", bits=5)
  with pytest.raises(ValueError, match=r"damp=0 is not supported"):
    quant.get("gptq", damp=0)
  with pytest.raises(ValueError, match=r"scale_dtype='bfloat16' is not supported"):
    quant.get("gptq", scale_dtype="bfloat16")
  q = quant.get("gptq", bits=4, group_size=8)
  w = np.ones((16, 4), np.float32)
  with pytest.raises(ValueError, match=r"hessian must be \[in, in\] = \[16, 16\]"):
    q.quantize_with_hessian(w, np.eye(8, dtype=np.float32))
  with pytest.raises(ValueError, match="hessian contains NaN"):
    q.quantize_with_hessian(w, np.full((16, 16), np.nan, np.float32))


def test_indefinite_hessian_retries_damping_once_then_fails():
  h = np.eye(16, dtype=np.float32)
  h[0, 1] = h[1, 0] = 3.0  # eigenvalue -2: no damping of 0.01 or 0.1 mean(diag) makes it definite
  q = quant.get("gptq", bits=4, group_size=8)
  with pytest.warns(UserWarning, match="retrying once with damp=0.1"):
    with pytest.raises(ValueError, match=r"hessian: .* not positive definite even with damp=0.1 \(first damp=0.01\)"):
      q.quantize_with_hessian(np.ones((16, 4), np.float32), h)
  h[0, 1] = h[1, 0] = 1.05  # eigenvalue -0.05: 0.1 mean(diag) fixes it
  with pytest.warns(UserWarning, match="retrying once"):
    qt = q.quantize_with_hessian(np.ones((16, 4), np.float32), h)
  assert np.isfinite(np.asarray(qt.dequantize())).all()


# ------------------------------------------------------------------------------------- calibration driver


@pytest.fixture(scope="module")
def tiny():
  return models.tiny_model()


def test_each_layers_hessian_comes_from_the_quantized_model_before_it(tiny):
  """True sequential, checked by hand on block 0: q/k/v see norm(embed(x)); down_proj sees
  silu(x3 W~_gate) * (x3 W~_up) with the QUANTIZED gate and up (and everything before them quantized)."""
  config = tiny.config.replace(num_layers=1)
  params = {**tiny.params, "blocks": jax.tree.map(lambda a: a[:1], tiny.params["blocks"])}
  tokens = np.random.default_rng(0).integers(0, 256, size=(4, 64))
  int3 = quant.get("int", bits=3, group_size=32)
  frozen, stats = calibration.quantize_model(config, params, tokens, int3, progress=False)
  p, q = jax.tree.map(lambda a: a[0], params["blocks"]), jax.tree.map(lambda a: a[0], frozen["blocks"])
  n = tokens.size

  def check(name, group, x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    h = 2.0 / n * x.T @ x
    w, wq = np.asarray(p[group][name]["kernel"], np.float64), np.asarray(q[group][name]["kernel"].dequantize())
    d = w - wq
    want = np.trace(d.T @ h @ d) / np.trace(w.T @ h @ w)
    assert stats.layer_errors[f"blocks/{group}/{name}/kernel"][0] == pytest.approx(want, rel=1e-4)

  emb = np.asarray(params["embed"]["embedding"])[tokens]
  x1 = models.layers.rms_norm(jnp.asarray(emb), p["attn_norm"]["scale"], config.rms_eps)
  for name in ("q_proj", "k_proj", "v_proj"):
    check(name, "attn", x1)
  block = models.llama.decoder(config, frozen).blocks
  graphdef, state = nnx.split(block)
  first = jax.tree.map(lambda a: a[0], state)
  b = nnx.merge(graphdef, first)
  positions = jnp.broadcast_to(jnp.arange(64), tokens.shape)
  cos, sin = models.layers.rope_angles(positions, models.config.rope_frequencies(config))
  mask = models.llama.attention_mask(config, jnp.ones(tokens.shape, bool), 0)
  a, _ = b.attn(b.attn_norm(jnp.asarray(emb)), cos, sin, mask, None, 0)
  x3 = b.mlp_norm(jnp.asarray(emb) + a)
  x4 = (jax.nn.silu(x3 @ q["mlp"]["gate_proj"]["kernel"].dequantize())
        * (x3 @ q["mlp"]["up_proj"]["kernel"].dequantize()))
  check("down_proj", "mlp", x4)


def test_calibrated_gptq_beats_round_to_nearest_on_a_tiny_model(tiny):
  tokens = np.random.default_rng(0).integers(0, 256, size=(4, 64))
  frozen, stats = calibration.quantize_model(tiny.config, tiny.params, tokens,
                                             quant.get("gptq", bits=3, group_size=32), progress=False)
  rtn_frozen, rtn = calibration.quantize_model(tiny.config, tiny.params, tokens,
                                               quant.get("int", bits=3, group_size=32), progress=False)
  reference, _ = models.quantize_params(tiny.params, quant.get("int", bits=3, group_size=32))
  assert jax.tree.structure(frozen) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(rtn_frozen), jax.tree.leaves(reference)):  # same quantizer, same tensors
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(stats.layer_errors) == {f"blocks/{g}/{n}_proj/kernel" for g, ns in
                                     (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for n in ns}
  assert all(e.shape == (2,) for e in stats.layer_errors.values())
  assert stats.output_rel_error < 0.9 * rtn.output_rel_error
  logits = models.apply(tiny.config, frozen, jnp.asarray(tokens[:1]))
  assert np.isfinite(np.asarray(logits)).all()


def test_too_few_calibration_tokens_says_how_many(tiny):
  with pytest.raises(ValueError, match=r"2 segments x 32 tokens = 64 tokens are too few for layers 128 inputs "
                                       r"wide; allowed: at least 128 tokens \(n_segments >= 4 at seq_len=32\)"):
    calibration.quantize_model(tiny.config, tiny.params, np.zeros((2, 32), np.int32), quant.get("gptq"))


def test_calibration_tokens_come_from_the_training_plays(tiny, tmp_path):
  for play, text in {"comedies/a": "ab" * 300, "romances/the-tempest": "zz" * 300}.items():
    (tmp_path / play).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{play}.md").write_text(text)
  tokens = calibration.calibration_tokens(tiny, n_segments=5, seq_len=16, seed=1, corpus=str(tmp_path))
  assert tokens.shape == (5, 16) and tokens.dtype == np.int32
  assert set(np.unique(tokens)) <= set(tiny.tokenizer.encode("ab")) | {257}  # the held-out play never appears
  again = calibration.calibration_tokens(tiny, n_segments=5, seq_len=16, seed=1, corpus=str(tmp_path))
  np.testing.assert_array_equal(tokens, again)
  held = calibration.heldout_tokens(tiny, 100, corpus=str(tmp_path))
  assert len(held) == 100 and set(np.unique(held)) == set(tiny.tokenizer.encode("z"))
  with pytest.raises(ValueError, match="n_segments=0 is not supported; allowed: a positive integer"):
    calibration.calibration_tokens(tiny, n_segments=0, corpus=str(tmp_path))
  with pytest.raises(ValueError, match="seq_len=1000 is not supported; allowed: an integer in 2..256"):
    calibration.calibration_tokens(tiny, seq_len=1000, corpus=str(tmp_path))


@pytest.mark.real_model
def test_gptq_on_two_smollm2_blocks_beats_round_to_nearest():
  lm = models.load("smollm2-135m")
  config = lm.config.replace(num_layers=2)
  params = {**lm.params, "blocks": jax.tree.map(lambda a: a[:2], lm.params["blocks"])}
  tokens = calibration.calibration_tokens(lm, n_segments=6, seq_len=256)  # the fewest the widest layer allows
  errors = {name: calibration.quantize_model(config, params, tokens, quant.get(name, bits=3, group_size=128),
                                             progress=False)[1].output_rel_error for name in ("int", "gptq")}
  assert errors["gptq"] < 0.7 * errors["int"]
