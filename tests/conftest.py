"""Shared fixtures. Real-model tests fetch SmolLM2-135M once into the asset cache.

Many tests train and evaluate the same tiny model, in this process and in subprocesses: a compilation cache
shared by all of them (a fresh directory per test session, set before JAX is imported) compiles each
program once.
"""

import os
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qalora-jax-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="session")
def smollm2_gguf():
  from qalora_jax import assets

  return assets.fetch("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_kernels(smollm2_gguf):
  """A few real [in, out] kernels of SmolLM2 (block 5: every shape the model has)."""
  from qalora_jax.models import gguf

  return {name: k for name, k in gguf.linear_kernels(smollm2_gguf) if name.startswith("blk.5.")}
