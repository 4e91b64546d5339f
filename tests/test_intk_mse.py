"""`int-mse`: never worse than `int` per group, really clips heavy tails, emits `int` tensors (so QA-LoRA's
merge into the offsets is exact), bad options."""

import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import nn, quant


def group_errors(w, qt):
  """Squared error per group [groups, out]."""
  d = np.square(np.asarray(qt.dequantize(jnp.float32)) - w)
  g = qt.group_size
  pad = (-w.shape[0]) % g
  return np.pad(d, [(0, pad), (0, 0)]).reshape(-1, g, w.shape[1]).sum(axis=1)


def weights(kind, n_in, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return (rng.normal(size=(n_in, 16)) * 0.02).astype(np.float32)
  return (rng.standard_t(2, size=(n_in, 16)) * 0.02).astype(np.float32)  # heavy tails: outliers


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("bits, group, n_in", [(3, 32, 100), (2, -1, 64)])
def test_never_worse_than_int_in_any_group(kind, bits, group, n_in):
  w = weights(kind, n_in, seed=bits)
  base = quant.get("int", bits=bits, group_size=group).quantize(w)
  mse = quant.get("int-mse", bits=bits, group_size=group).quantize(w)
  e_base, e_mse = group_errors(w, base), group_errors(w, mse)
  assert (e_mse <= e_base).all()
  assert e_mse.sum() < 0.95 * e_base.sum()  # and better overall
  if kind == "heavy":  # the outliers are clipped: some stored ranges lie strictly inside [min, max]
    top = mse["offset"].astype(jnp.float32) + (2**bits - 1) * mse["scale"].astype(jnp.float32)
    g = mse.group_size
    wmax = np.pad(w, [(0, (-n_in) % g), (0, 0)], mode="edge").reshape(-1, g, 16).max(axis=1)
    assert (np.asarray(top) < wmax - 1e-3).any()


def test_same_format_as_int():
  w = weights("heavy", 100)
  base = quant.get("int", bits=3, group_size=32).quantize(w)
  mse = quant.get("int-mse", bits=3, group_size=32).quantize(w)
  assert mse.meta == base.meta and mse.format == "int"
  layout = lambda qt: {k: (a.shape, a.dtype) for k, a in qt.arrays.items()}  # noqa: E731
  assert layout(mse) == layout(base)
  assert mse.nbytes == base.nbytes and quant.has_group_offset(mse)


def test_qalora_merge_is_exact():
  rng = np.random.default_rng(0)
  w = weights("heavy", 100)
  qt = quant.get("int-mse", bits=3, group_size=32, scale_dtype="float32").quantize(w)
  init = nn.init_adapter(jnp.zeros(2, jnp.uint32), "qalora", 100, 16, 4, alpha=8.0, group_size=qt.group_size)
  ad = nn.Adapter(init.a, jnp.asarray(0.1 * rng.normal(size=init.b.shape), jnp.float32), init.meta)
  x = jnp.asarray(rng.normal(size=(5, 100)).astype(np.float32))
  unmerged = nn.linear(x, {"kernel": qt, "adapter": ad})
  merged_qt = nn.merge_into_offsets(qt, ad)
  merged = nn.linear(x, {"kernel": merged_qt})
  assert float(jnp.abs(merged - unmerged).max()) <= 1e-5 * float(jnp.abs(unmerged).max())
  assert merged_qt.meta == qt.meta and merged_qt.nbytes == qt.nbytes


@pytest.mark.parametrize("options, message", [
    (dict(bits=9), "bits=9 is not supported; allowed: 2, 3, 4, 5, 6, 7, 8"),
    (dict(group_size=0), "group_size=0 is not supported; allowed: a positive integer or -1"),
    (dict(scale_dtype="int8"), "scale_dtype='int8' is not supported; allowed: float16, bfloat16, float32"),
    (dict(grid=1), "grid=1 is not supported; allowed: an integer in 2..256"),
    (dict(min_shrink=1.0), "min_shrink=1.0 is not supported; allowed: a number in \\(0, 1\\)"),
    (dict(min_shrink=0), "min_shrink=0 is not supported"),
    (dict(symmetric=True), "unknown option 'symmetric' for quantizer 'int-mse'"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    quant.get("int-mse", **options)


def test_group_larger_than_the_input_is_refused():
  with pytest.raises(ValueError, match="group_size=128 is not supported for input dimension 64"):
    quant.get("int-mse", group_size=128).quantize(np.zeros((64, 4), np.float32))
