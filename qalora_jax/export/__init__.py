"""Interop: PEFT adapter directories (and, later, GPTQ-layout checkpoints)."""
