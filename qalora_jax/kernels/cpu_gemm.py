"""Float32 training products with an INT4 or INT8 QTensor on the CPU: y = x W~ and dx = dy W~^T, the weight
dequantized inside the product.

XLA's CPU backend dequantizes a quantized weight into a float32 copy, writes it, and multiplies with its own
GEMM, which at the training step's shapes runs at about 0.8x PyTorch's float32 rate (experiments/perf/
matmul_shapes.md). This kernel (cpu_gemm.cc) is a blocked GEMM whose packing step reads the codes,

    W~[i, o] = scale[g, o] * q[i, o] + offset[g, o]      (i in group g),

and writes the float32 panels its 14 x 32 AVX512 tile multiplies, so no float32 copy of W~ exists outside the
cache-sized panels. Its products are float32 products summed in float32 (in another order than XLA's), so it
runs where the operands are float32: `base_matmul` (nn/linear.py) calls it for x W~ and for the input gradient
dy W~^T, and the fused head (models/layers.py's `head_nll`) for its products with an 8-bit token table, when
the matmul dtype is float32, the backend a CPU with the kernels compiled (kernels.cpu_library), and the weight
`supports` it. QALORA_CPU_GEMM=0 in the environment keeps XLA's dequantize-then-dot.

On a CPU with AMX (`cpu_library.amx`), the same products run on its bfloat16 tiles at float32 precision: each
float32 operand splits exactly into three bfloat16 parts, a = a0 + a1 + a2 (|a1| <= 2^-8 |a|, |a2| <= 2^-16 |a|),
and

    a b = a0 b0 + a0 b1 + a1 b0 + a0 b2 + a2 b0 + a1 b1 + e,     |e| <= 2^-23 |a b|;

the tiles multiply bfloat16 pairs exactly and sum in float32, each part product rounding into the sum (sums
longer than 2048 stay on AVX512 FMAs). Against float64 that is float32's error in such sums (tests/test_cpu_gemm.py;
at most 7.1e-7 of the largest entry at the training step's shapes, where XLA's float32 dot reaches 1.0e-6:
experiments/perf/matmul_shapes.md), and six tile products cost less than one AVX512 pass over the same values:
the step's products take 0.85x the AVX512 kernel's time. QALORA_CPU_AMX=0 keeps the AVX512 kernel.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.kernels.cpu_library import amx, available
from qalora_jax.quant import QTensor

TARGET = "qalora_cpu_gemm"
MIN_ROWS = 64  # fewer rows (decoding) leave the tile mostly empty: XLA's matrix-vector products are faster
# Outputs narrower than this run well below the GEMM's rate (SmolLM2's k and v, 192 columns: 0.55x gate's and
# up's in experiments/perf/matmul_shapes.md): side by side with the products that read the same x, they reach it
# (nn.linear.shared_folded). Wider ones are at the rate already, and the copies of a side-by-side product's
# outputs and gradients cost more than packing x once saves (gate and up side by side too: 0.93-0.99x the
# float32 step's tokens/s with q/k/v alone side by side, 4 alternating runs).
NARROW = 512


def supports(kernel, rows: int, dtype) -> bool:
  """Whether `matmul` takes this product: float32 operands, at least MIN_ROWS rows, a 2-D INT4 or INT8 "int"
  QTensor with `in` a multiple of 32 and groups a multiple of 16, and the kernels available here."""
  if not (isinstance(kernel, QTensor) and kernel.format == "int" and kernel.bits in (4, 8)):
    return False
  n_in, _ = kernel.shape
  return (jnp.dtype(dtype) == jnp.float32 and rows >= MIN_ROWS and kernel["codes"].ndim == 2 and n_in % 32 == 0
          and kernel.group_size % 16 == 0 and os.environ.get("QALORA_CPU_GEMM") != "0" and available())


def engine(dtype) -> str:
  """What runs the float32 training products of a model quantized to INT4: "amx", "avx512" (this kernel) or "xla"
  (XLA's dequantize-then-dot), for benchmark records."""
  if jnp.dtype(dtype) != jnp.float32 or os.environ.get("QALORA_CPU_GEMM") == "0" or not available():
    return "xla"
  return "amx" if amx() else "avx512"


def matmul(x: jax.Array, qt: QTensor, transpose: bool = False, offset_delta: jax.Array | None = None) -> jax.Array:
  """x W~ [..., out] for x [..., in]; with `transpose`, x W~^T [..., in] for x [..., out]; float32 products and
  sums, the result in x.dtype. `offset_delta` [groups, out] (float32) is added to the offsets first: the product
  is then with W~ + P delta, P_il = [i in group l] (a QA-LoRA adapter folded in, nn/linear.py)."""
  if not available():
    raise RuntimeError("the CPU kernels are unavailable here (see kernels.cpu_library)")
  n_in, n_out = qt.shape
  rows = x.reshape(-1, n_out if transpose else n_in).astype(jnp.float32)
  scale = qt["scale"].astype(jnp.float32)
  offset = qt["offset"].astype(jnp.float32) if "offset" in qt.arrays else -(2.0 ** (qt.bits - 1)) * scale
  if offset_delta is not None:
    offset = offset + offset_delta.astype(jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], n_in if transpose else n_out), jnp.float32),
                          vmap_method="sequential")
  y = call(rows, qt["codes"], scale, offset, group=np.int64(qt.group_size), bits=np.int64(qt.bits),
           transpose=np.int64(transpose), tiles=np.int64(amx()))
  return y.reshape(x.shape[:-1] + y.shape[-1:]).astype(x.dtype)
