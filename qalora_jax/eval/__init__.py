"""Evaluation: quantization error reports, perplexity, few-shot multiple choice, generation samples."""
