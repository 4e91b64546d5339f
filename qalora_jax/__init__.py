"""qalora-jax: fine-tune quantized language models with LoRA, QLoRA and QA-LoRA in JAX."""

__version__ = "0.1.0"

__all__ = ["AdapterParam", "Frozen", "Rule", "adapt", "merge"]  # the Flax entry points, from qalora_jax.nn


def __getattr__(name: str):
  """The Flax entry points, imported on first use, so that `qalora` (the command line) starts without Flax."""
  if name in __all__:
    from qalora_jax import nn

    return getattr(nn, name)
  raise AttributeError(f"module 'qalora_jax' has no attribute {name!r}")
