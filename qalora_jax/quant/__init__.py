"""Quantized tensors, bit packing, and the quantizer registry.

    qt = quant.get("int", bits=4, group_size=128).quantize(w)   # w: float [in, out]
    w_hat = qt.dequantize(jnp.float32)
    qt.nbytes                                                  # true storage size

Every quantizer lives in its own module here and registers itself by name on import. Importing this
package imports all of its modules (registry.discover_package), so a new quantizer module needs no edit
elsewhere; quantizers from outside the package come in through `import_modules`.
"""

from qalora_jax.quant.packing import pack, packed_length, unpack
from qalora_jax.quant.qtensor import QMeta, QTensor
from qalora_jax.quant.registry import (Quantizer, available, discover_package, get, has_group_offset, import_modules,
                                       quantize_stacked, register)

discover_package()  # last: the quantizer modules may use the names above

__all__ = ["QMeta", "QTensor", "Quantizer", "available", "discover_package", "get", "has_group_offset",
           "import_modules", "pack", "packed_length", "quantize_stacked", "register", "unpack"]
