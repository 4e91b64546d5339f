"""LLaMA-family decoders, their loaders (GGUF, Hugging Face safetensors), tokenizers and generation.

    lm = models.load("smollm2-135m")          # or a .gguf path, or a Hugging Face model directory
    logits = lm.apply(lm.params, tokens)      # [batch, seq, vocab], float32
    nll = models.nll(lm.config, lm.params, tokens, targets)   # [batch, seq]: the head and softmax fused
    texts = models.generate(lm, ["Once upon a time"], max_new_tokens=32)
    models.save(lm, "out_dir"); lm = models.load("out_dir")   # a saved model directory (QTensors as they are)
    frozen, summary = models.quantize_params(lm.params, quant.get("int", bits=4, group_size=64))
    ppl = models.perplexity(lm.replace(params=frozen), ids)
"""

from qalora_jax.models.assemble import CheckpointError
from qalora_jax.models.config import Config, RopeScaling
from qalora_jax.models.generation import generate, generate_tokens
from qalora_jax.models.llama import apply, forward, init_params, nll, param_paths, param_shapes
from qalora_jax.models.lm import LanguageModel, load, model_names, save, saved_info
from qalora_jax.models.metrics import model_perplexity, perplexity, token_nll
from qalora_jax.models.quantize import BLOCK_LINEARS, QuantizeSummary, load_quantized, quantize_params, save_quantized
from qalora_jax.models.tiny import tiny_model
from qalora_jax.models.tokenizer import Tokenizer

__all__ = [
    "BLOCK_LINEARS", "CheckpointError", "Config", "LanguageModel", "QuantizeSummary", "RopeScaling", "Tokenizer",
    "apply", "forward", "generate", "generate_tokens", "init_params", "load", "model_names", "param_paths",
    "load_quantized", "model_perplexity", "nll", "param_shapes", "perplexity", "quantize_params", "save",
    "save_quantized", "saved_info", "tiny_model", "token_nll",
]
