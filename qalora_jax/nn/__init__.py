"""Linear layers with quantized weights and low-rank adapters, and the exact merges.

Flax NNX: `Linear` (a Frozen kernel, float or QTensor, and an optional `LowRankAdapter` whose factors are
`AdapterParam`s, a subclass of nnx.LoRAParam); `adapt(model, rules)` quantizes and adapts any NNX model's
linear layers; `merge(model)` folds the adapters in. The functional core underneath (nested-dict trees,
`linear`, `add_adapters`, `merge_params`) is what the NNX modules call.
"""

from qalora_jax.nn.adapt_model import Rule, adapt, linear_layers as module_layers, merge, stats
from qalora_jax.nn.modules import AdapterParam, AxesLayout, EinsumLayout, Frozen, Linear, LowRankAdapter, adapted_layers
from qalora_jax.nn.trees import (ALL_LINEARS, adapter_ranks, add_adapters, combine, count_params, linear_layers,
                                 merge_params, tree_nbytes)
from qalora_jax.nn.adapters import Adapter, AdapterMeta, adapter_delta, delta_weight, init_adapter, pool_groups
from qalora_jax.nn.linear import linear, materialize
from qalora_jax.nn.merge import merge_adapter, merge_into_kernel, merge_into_offsets

__all__ = ["AdapterParam", "AxesLayout", "EinsumLayout", "Frozen", "Linear", "LowRankAdapter", "Rule", "adapt",
           "adapted_layers", "merge", "module_layers", "stats",
           "ALL_LINEARS", "adapter_ranks", "add_adapters", "combine", "count_params", "linear_layers", "merge_params",
           "tree_nbytes",
           "Adapter", "AdapterMeta", "adapter_delta", "delta_weight", "init_adapter", "linear", "materialize",
           "merge_adapter", "merge_into_kernel", "merge_into_offsets", "pool_groups"]
