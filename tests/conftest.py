"""Shared fixtures. Real-model tests fetch SmolLM2-135M once into the asset cache.

Many tests train and evaluate the same tiny model, in this process and in subprocesses: a compilation cache
shared by all of them (a fresh directory per test session, set before JAX is imported) compiles each
program once.

The tests' programs are compiled with LLVM's optimizations off (`--xla_backend_optimization_level=0`, appended to
any XLA_FLAGS given): on tiny models compiling is most of a test's time, and this cuts the suite's by about a
tenth. XLA's HLO passes are the same as at the default level (only the machine code is less optimized); the
benchmarks and experiments compile as users do.
"""

import os
import tempfile

import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qalora-jax-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


@pytest.fixture(scope="session")
def smollm2_gguf():
  from qalora_jax import assets

  return assets.fetch("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_kernels(smollm2_gguf):
  """A few real [in, out] kernels of SmolLM2 (block 5: every shape the model has)."""
  from qalora_jax.models import gguf

  return {name: k for name, k in gguf.linear_kernels(smollm2_gguf) if name.startswith("blk.5.")}


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
  """transformers' LlamaForCausalLM loaded from the same GGUF, float32, in eval mode: the reference the real-model
  tests compare with. Loaded once (reading the GGUF's metadata takes transformers about 12 s); a test that
  changes it works on a copy."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
