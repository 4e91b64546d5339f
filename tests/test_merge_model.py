"""QA-LoRA merge on a whole (tiny) model after real training steps: logits unchanged, still INT-k, no
adapter leaves, same storage; PEFT-style counts of optimizer state."""

import jax
import jax.numpy as jnp
import pytest

from qalora_jax import nn, quant
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop


def trained_run(bits, scale_dtype, steps=5):
  cfg = config_lib.load("configs/tiny.py", [f"--config.base.options.bits={bits}",
                                           f"--config.base.options.scale_dtype={scale_dtype}"])
  r = experiment.build(cfg, log=lambda m: None)
  state, held = loop.train_steps(r, steps)
  return r, state, held


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_merged_logits_equal_unmerged(bits):
  r, state, held = trained_run(bits, "float32")
  assert all(float(jnp.abs(a.b).max()) > 0 for _, a in nn.trees.adapter_layers(r.adapters(state.trainable)))
  merged = r.merged(state.trainable)
  tokens = jnp.asarray(held[:128].reshape(2, 64))
  unmerged_logits = r.apply(r.params(state.trainable), tokens)
  merged_logits = r.apply(merged, tokens)
  assert float(jnp.abs(merged_logits - unmerged_logits).max()) <= 1e-4 * float(jnp.abs(unmerged_logits).max())
  leaves = jax.tree.leaves(merged, is_leaf=lambda x: isinstance(x, (nn.Adapter, quant.QTensor)))
  assert not any(isinstance(x, nn.Adapter) for x in leaves)
  kernels = [x for x in leaves if isinstance(x, quant.QTensor)]
  assert len(kernels) == 7 and all(k.format == "int" and k.bits == bits for k in kernels)
  assert nn.tree_nbytes(merged) == nn.tree_nbytes(r.frozen)


def test_optimizer_state_holds_only_the_adapters():
  r, state, _ = trained_run(4, "float16", steps=1)
  moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  counters = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
  assert moments == 2 * nn.tree_nbytes(state.trainable)
  assert counters <= 16  # step counts only
