"""Quantized tensors, bit packing, and the quantizer registry.

    qt = quant.get("int", bits=4, group_size=128).quantize(w)   # w: float [in, out]
    w_hat = qt.dequantize(jnp.float32)
    qt.nbytes                                                  # true storage size

Every quantizer lives in its own module here and registers itself by name on import.
"""

from qalora_jax.quant import intk, nf4  # noqa: F401  (importing registers the quantizers)
from qalora_jax.quant import gptq  # noqa: F401  (registers "gptq")
from qalora_jax.quant.packing import pack, packed_length, unpack
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.registry import Quantizer, available, get, has_group_offset, quantize_stacked, register

__all__ = ["QMeta", "QTensor", "Quantizer", "available", "get", "has_group_offset", "pack", "packed_length", "quantize_stacked", "register", "unpack"]
