"""The decoder as Flax NNX modules: its state mirrors the parameter tree, the training run splits it into adapter
and frozen states, and the stateful Flax style (nnx.Optimizer + nnx.DiffState) trains the same adapters to the
same values as the run's pure step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qalora_jax import data, models, nn, quant
from qalora_jax.models import llama
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop


@pytest.fixture(scope="module")
def tiny():
  return models.tiny_model()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_state_has_the_parameter_trees_layout(tiny, scan_layers):
  params = tiny.params if scan_layers else llama.unstack_blocks(tiny.params)
  frozen, _ = models.quantize_params(params, [(r"blocks/(\d+/)?(attn|mlp)/\w+_proj/kernel",
                                                quant.get("int", bits=4, group_size=32))])
  adapters = nn.add_adapters(frozen, "qalora", rank=4, alpha=8.0, key=jax.random.PRNGKey(0))
  model = tiny.decoder(nn.combine(frozen, adapters))
  assert isinstance(model.blocks, nnx.List) != scan_layers
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nn.Frozen))}
  assert paths == set(models.param_paths(frozen))
  trained = nnx.state(model, nn.AdapterParam)
  assert sum(x.size for x in jax.tree.leaves(trained)) == nn.count_params(adapters)
  # back to the tree, bit for bit, adapters included
  back = llama.params_of(model)
  assert jax.tree.structure(back) == jax.tree.structure(nn.combine(frozen, adapters))
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(nn.combine(frozen, adapters))):
    np.testing.assert_array_equal(x, y)
  tokens = jnp.asarray([[256, 72, 101, 108, 108, 111]])
  np.testing.assert_array_equal(model(tokens), models.apply(tiny.config, nn.combine(frozen, adapters), tokens))


def test_a_run_splits_adapters_from_the_frozen_base():
  cfg = config_lib.load("configs/tiny.py", ["--config.adapter.extra_trainable=.*final_norm/scale"])
  r = experiment.build(cfg, log=lambda m: None)
  kinds = {type(v).__name__ for v in jax.tree.leaves(r.trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert kinds == {"AdapterParam", "Param"}  # the adapters, and the norm the config trains explicitly
  frozen = jax.tree.leaves(r.frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert all(isinstance(v, nn.Frozen) for v in frozen)
  assert sum(isinstance(v.get_value(), quant.QTensor) for v in frozen) == 7  # the stacked block linears


def test_stateful_flax_training_gives_the_runs_adapters():
  cfg = config_lib.load("configs/tiny.py", [])
  r = experiment.build(cfg, log=lambda m: None)
  steps = 3
  state, _ = loop.train_steps(r, steps)

  model = nnx.clone(r.model(r.trainable))  # the Optimizer updates the model's Variables in place
  optimizer = nnx.Optimizer(model, r.optimizer, wrt=nn.AdapterParam)
  blocks, mask, _ = experiment.training_data(cfg, r.lm)

  def loss_fn(model, batch):
    return model.nll(batch["inputs"], batch["targets"]).mean()

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nn.AdapterParam))(model, batch)
    optimizer.update(model, grads)
    return loss

  for s in range(steps):
    step(model, optimizer, jax.tree.map(jnp.asarray, data.batch_at(blocks, cfg.data.batch_size, cfg.seed, s, mask)))
  ours = nnx.state(model, nn.AdapterParam)
  for x, y in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ours)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(r.trainable), jax.tree.leaves(ours)))
  assert moved > 1e-4


def test_nnx_display_shows_an_adapted_layer(tiny, capsys):
  frozen, _ = models.quantize_params(tiny.params, quant.get("int", bits=4, group_size=32))
  model = tiny.decoder(nn.combine(frozen, nn.add_adapters(frozen, "qalora", rank=4, alpha=8.0,
                                                          key=jax.random.PRNGKey(0))))
  nnx.display(model.blocks.attn.q_proj)
  shown = capsys.readouterr().out
  assert "Frozen" in shown and "QTensor(int" in shown and "AdapterParam" in shown and "kind='qalora'" in shown
