"""qalora-jax: fine-tune quantized language models with LoRA, QLoRA and QA-LoRA in JAX."""

__version__ = "0.1.0"
