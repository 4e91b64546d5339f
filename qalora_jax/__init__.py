"""qalora-jax: fine-tune quantized language models with LoRA, QLoRA and QA-LoRA in JAX."""

__version__ = "0.1.0"

from qalora_jax.nn import AdapterParam, Frozen, Rule, adapt, merge  # noqa: E402  (the Flax entry points)

__all__ = ["AdapterParam", "Frozen", "Rule", "adapt", "merge"]
