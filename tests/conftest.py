"""Shared fixtures. Real-model tests fetch SmolLM2-135M once into the asset cache."""

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
  from qalora_jax import assets

  return assets.fetch("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_kernels(smollm2_gguf):
  """A few real [in, out] kernels of SmolLM2 (block 5: every shape the model has)."""
  from qalora_jax.models import gguf

  return {name: k for name, k in gguf.linear_kernels(smollm2_gguf) if name.startswith("blk.5.")}
