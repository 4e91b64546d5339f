"""The contract every registered quantizer meets. A quantizer registered later is tested here as soon as it
is imported: the cases come from `available()` and each quantizer's `contract_settings`; every module of
qalora_jax.quant is imported with the package, and outside modules listed in $QALORA_IMPORTS (comma-separated
module names or .py paths) before the cases are collected."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qalora_jax import quant

# Quantizers defined outside the package join the suite when their modules are named here, e.g.
#   QALORA_IMPORTS=experiments/custom_quantizer/pow2int.py pytest tests/test_quant_contract.py -k pow2
quant.import_modules([s for s in os.environ.get("QALORA_IMPORTS", "").split(",") if s], where="QALORA_IMPORTS")
CASES = [(name, opts) for name in quant.available()
         for opts in quant.registry.quantizer_class(name).contract_settings]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items()) or 'default'}" for name, opts in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
  name, opts = request.param
  w = (np.random.default_rng(0).standard_t(5, size=(128, 24)) * 0.05).astype(np.float32)
  quantizer = quant.get(name, **opts)
  return quantizer, w, quantizer.quantize(w)


def test_every_quantizer_is_covered():
  assert {"int", "nf4", "fp4"} <= set(quant.available())
  # every quantizer of the package (and of QALORA_IMPORTS); other tests may register more at run time
  collected = {name for name, _ in CASES}
  ours = {n for n in quant.available() if quant.registry.quantizer_class(n).__module__.startswith("qalora_jax.")}
  assert ours <= collected


def test_shapes_and_dtypes(case):
  _, w, qt = case
  assert qt.shape == w.shape
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    out = qt.dequantize(dtype)
    assert out.shape == w.shape and out.dtype == dtype


def test_error_bound(case):
  quantizer, w, qt = case
  err = np.abs(np.asarray(qt.dequantize(jnp.float32)) - w)
  bound = np.asarray(quantizer.error_bound(w, qt))
  assert bound.shape == w.shape
  assert (err <= bound).all(), f"max excess {np.max(err - bound)}"
  assert err.max() > 0  # a real quantizer loses something on t-distributed weights


def test_jit_matches_eager(case):
  _, _, qt = case
  eager = qt.dequantize(jnp.float32)
  jitted = jax.jit(lambda t: t.dequantize(jnp.float32))(qt)
  # XLA may fuse a multiply-add into one FMA under jit: allow an ulp or two of the largest term.
  eager = np.asarray(eager)
  np.testing.assert_allclose(np.asarray(jitted), eager, rtol=0, atol=4e-7 * np.abs(eager).max())


def test_pytree_round_trip(case):
  _, _, qt = case
  leaves, treedef = jax.tree.flatten(qt)
  assert all(isinstance(x, jax.Array) for x in leaves)
  again = jax.tree.unflatten(treedef, leaves)
  assert again.meta == qt.meta
  # tree maps keep the type and the metadata
  doubled = jax.tree.map(lambda x: x, qt)
  assert isinstance(doubled, quant.QTensor) and doubled.meta == qt.meta
  np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(qt.dequantize()))


def test_stacked_tensors_dequantize_per_layer(case):
  quantizer, w, qt = case
  other = quantizer.quantize(w[::-1].copy())
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), qt, other)
  got = np.asarray(stacked.dequantize(jnp.float32))
  np.testing.assert_array_equal(got[0], np.asarray(qt.dequantize()))
  np.testing.assert_array_equal(got[1], np.asarray(other.dequantize()))


def test_group_offset_is_additive(case):
  """What QA-LoRA's merge relies on: adding d[l, j] to offset[l, j] adds d[l, j] to every weight of group l."""
  _, w, qt = case
  if not quant.has_group_offset(qt):
    pytest.skip(f"{qt.format} {dict(qt.meta.options)} carries no per-group offset")
  groups = quant.groups.num_groups(w.shape[0], qt.group_size)
  offset = qt["offset"]
  assert offset.shape == (groups, w.shape[1])
  delta = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, offset.shape).astype(offset.dtype))
  shifted = quant.QTensor({**qt.arrays, "offset": (offset.astype(jnp.float32) + delta.astype(jnp.float32)
                                                   ).astype(offset.dtype)}, qt.meta)
  stored = shifted["offset"].astype(jnp.float32) - offset.astype(jnp.float32)  # the shift as stored
  expected = np.asarray(qt.dequantize(jnp.float32)) + np.repeat(np.asarray(stored), qt.group_size, axis=0)[:w.shape[0]]
  np.testing.assert_allclose(np.asarray(shifted.dequantize(jnp.float32)), expected, rtol=0,
                             atol=4e-7 * (np.abs(expected).max() + 1))


def test_nbytes_is_sum_of_leaves(case):
  _, w, qt = case
  assert qt.nbytes == sum(x.nbytes for x in jax.tree.leaves(qt))
  assert qt.nbytes < w.nbytes / 2  # really packed: under 16 bits a weight


def test_deterministic(case):
  quantizer, w, qt = case
  again = quantizer.quantize(w.copy())
  for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_orbax_round_trip(case, tmp_path):
  _, _, qt = case
  tree = {"layer": {"kernel": qt}}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored = ckpt.restore(tmp_path / "ckpt", target)
  got = restored["layer"]["kernel"]
  assert isinstance(got, quant.QTensor) and got.meta == qt.meta
  for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(got)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_accepts_half_precision_weights(case):
  quantizer, w, _ = case
  qt = quantizer.quantize(jnp.asarray(w, jnp.bfloat16))
  assert qt.shape == w.shape


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((128,), np.float32), ValueError, "2-D"),
    (np.zeros((2, 128, 4), np.float32), ValueError, "2-D"),
    (np.zeros((128, 4), np.int32), TypeError, "floating"),
    (np.full((128, 4), np.nan, np.float32), ValueError, "NaN or Inf"),
    (np.full((128, 4), np.inf, np.float32), ValueError, "NaN or Inf"),
    ([[1.0, 2.0]], TypeError, "array"),
])
def test_bad_weights(case, bad, error, message):
  quantizer, _, _ = case
  with pytest.raises(error, match=message):
    quantizer.quantize(bad)


def test_unknown_option_names_the_allowed_ones(case):
  quantizer, _, _ = case
  with pytest.raises(ValueError, match="unknown option 'bogus'.*allowed"):
    quant.get(quantizer.name, bogus=1)


def test_unknown_quantizer_lists_available():
  with pytest.raises(ValueError, match="unknown quantizer 'nope'; available: .*int.*nf4"):
    quant.get("nope")


def test_register_rejects_duplicates_and_non_quantizers():
  with pytest.raises(ValueError, match="already registered"):
    quant.register("int")(quant.registry.quantizer_class("nf4"))
  with pytest.raises(TypeError, match="dataclass subclass of Quantizer"):
    quant.register("not-a-quantizer")(object)
