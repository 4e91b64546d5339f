"""Linear layers with quantized weights and low-rank adapters, and the exact merges."""

from qalora_jax.nn.adapt import (ALL_LINEARS, add_adapters, combine, count_params, linear_layers, merge_params,
                                 tree_nbytes)
from qalora_jax.nn.adapters import Adapter, AdapterMeta, adapter_delta, delta_weight, init_adapter, pool_groups
from qalora_jax.nn.linear import linear, materialize
from qalora_jax.nn.merge import merge_adapter, merge_into_kernel, merge_into_offsets

__all__ = ["ALL_LINEARS", "add_adapters", "combine", "count_params", "linear_layers", "merge_params", "tree_nbytes",
           "Adapter", "AdapterMeta", "adapter_delta", "delta_weight", "init_adapter", "linear", "materialize",
           "merge_adapter", "merge_into_kernel", "merge_into_offsets", "pool_groups"]
