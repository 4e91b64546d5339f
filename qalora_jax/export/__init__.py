"""Interop: PEFT adapter directories (peft), GPTQ-layout checkpoints (gptq), GGUF files for llama.cpp (gguf)."""
