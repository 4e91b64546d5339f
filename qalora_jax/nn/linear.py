"""The one place a weight meets an activation: y = x W (+ b) (+ the adapter branch).

W is a float kernel [in, out] or a QTensor, dequantized to the compute dtype here, so every method (float,
quantized, adapted) runs through the same model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qalora_jax.nn.adapters import Adapter, adapter_delta
from qalora_jax.quant import QTensor


def materialize(kernel, dtype) -> jax.Array:
  """A kernel as a float array of `dtype`: a QTensor is dequantized, a float array is cast."""
  if isinstance(kernel, QTensor):
    return kernel.dequantize(dtype)
  return jnp.asarray(kernel).astype(dtype)


def linear(x: jax.Array, p: dict, *, dropout_rng: jax.Array | None = None) -> jax.Array:
  """y = x W + b + s * (pool(x) A) B for p = {"kernel", optional "bias", optional "adapter"}."""
  y = jnp.einsum("...i,io->...o", x, materialize(p["kernel"], x.dtype))
  if p.get("bias") is not None:
    y = y + p["bias"].astype(x.dtype)
  adapter = p.get("adapter")
  if isinstance(adapter, Adapter):
    y = y + adapter_delta(x, adapter, dropout_rng=dropout_rng)
  return y
