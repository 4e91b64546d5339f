"""The Pallas INT4 dequantize-matmul in interpret mode against the reference x @ dequantize(W)."""

import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import quant
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
  assert not supported(ragged)  # 192 inputs: a group of 128 and a short one of 64
  for qt, block_k in ((tiled, 64), (ragged, 128)):
    got = int4_matmul(x, qt, block_k=block_k, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ qt.dequantize()), rtol=1e-5, atol=1e-4)
  assert int4_matmul(x, tiled, block_k=64, interpret=True).shape == (2, 3, 64)
  with pytest.raises(ValueError, match="x has 100 features; the weight expects in=192"):
    int4_matmul(jnp.zeros((1, 100)), tiled, interpret=True)
