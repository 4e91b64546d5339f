"""Hand-written kernels for the hot paths, each tested against a reference in plain JAX: `cpu_matmul` (C++
through XLA's FFI: int8 activations against packed INT4 / INT8 codes, for decoding on CPUs), `cpu_attention`
(C++: a decoding step's attention over the KV cache as it lies), both built by `cpu_library`, and
`int4_matmul` (Pallas: an INT4 dequantize-matmul for GPUs)."""
