"""LLaMA-family decoders and their loaders."""
