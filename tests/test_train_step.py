"""Train steps for LoRA, QLoRA and QA-LoRA on a toy network: jit, loss decreases, state only for trainables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import models, nn, quant, train, tree_paths

VOCAB, DIM = 16, 64


def toy_apply(params, tokens, dropout_rng=None):
  """embed -> norm scale -> linear (adapted) -> tanh -> linear (adapted) -> logits."""
  h = params["embed"][tokens] * params["norm"]["scale"]
  h = jnp.tanh(nn.linear(h, params["l1"], dropout_rng=dropout_rng))
  return nn.linear(h, params["l2"], dropout_rng=dropout_rng)


def toy_frozen(method):
  rng = np.random.default_rng(0)
  w1 = (rng.normal(size=(DIM, DIM)) / 8).astype(np.float32)
  w2 = (rng.normal(size=(DIM, VOCAB)) / 8).astype(np.float32)
  base = {"lora": lambda w: w, "qlora": quant.get("nf4", block_size=32, double_quant=True).quantize,
          "qalora": quant.get("int", bits=4, group_size=16).quantize}[method]
  return {"embed": rng.normal(size=(VOCAB, DIM)).astype(np.float32), "norm": {"scale": np.ones(DIM, np.float32)},
          "l1": {"kernel": base(w1)}, "l2": {"kernel": base(w2)}}


def toy_nll(params, tokens, targets, dropout_rng=None):
  return models.token_nll(toy_apply(params, tokens, dropout_rng), targets)


def batch():
  tokens = np.random.default_rng(1).integers(0, VOCAB, size=(8, 13))
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_loss_decreases_and_only_adapters_train(method):
  frozen = toy_frozen(method)
  kind = "qalora" if method == "qalora" else "lora"
  adapters = nn.add_adapters(frozen, kind, rank=4, alpha=8, key=jax.random.PRNGKey(0), targets="l1|l2",
                             dropout=0.05)
  init, step = train.make_train_step(toy_nll, train.make_optimizer(3e-2))
  state = init(adapters)
  # Optimizer state: AdamW's two moments for each trainable leaf, plus step counters.
  moment_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moment_bytes == 2 * nn.tree_nbytes(adapters)
  step = jax.jit(step)
  b = batch()
  losses = []
  for i in range(40):
    state, metrics = step(state, frozen, b, jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0]
  # The frozen tree is untouched and the trained adapters are still Adapters of the same shapes.
  assert jax.tree.structure(state.trainable) == jax.tree.structure(adapters)


def test_extra_trainable_leaves_by_regex():
  frozen = toy_frozen("qalora")
  extra, frozen_rest = tree_paths.partition(frozen, r"norm/scale")
  assert list(dict(tree_paths.flatten(extra))) == ["norm/scale"]
  assert "norm" not in frozen_rest
  adapters = nn.add_adapters(frozen_rest, "qalora", rank=4, alpha=8, key=jax.random.PRNGKey(0), targets="l1")
  trainable = nn.combine(adapters, extra)
  init, step = train.make_train_step(toy_nll, train.make_optimizer(1e-2))
  state, _ = jax.jit(step)(init(trainable), frozen_rest, batch(), jax.random.PRNGKey(0))
  assert not np.allclose(state.trainable["norm"]["scale"], 1.0)  # the norm trained explicitly


def test_gradient_accumulation_matches_one_big_batch():
  frozen = toy_frozen("lora")
  adapters = nn.add_adapters(frozen, "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0), targets="l1|l2")
  adapters["l2"]["adapter"] = nn.Adapter(adapters["l2"]["adapter"].a, adapters["l2"]["adapter"].b + 0.05,
                                         adapters["l2"]["adapter"].meta)
  b = batch()
  outs = []
  for accum in (1, 4):
    init, step = train.make_train_step(toy_nll, train.make_optimizer(1e-2, max_grad_norm=None), accum_steps=accum)
    state, metrics = jax.jit(step)(init(adapters), frozen, b, jax.random.PRNGKey(0))
    outs.append((float(metrics["loss"]), state.trainable))
  assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
  for a, c in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)


def test_masked_positions_do_not_count():
  frozen = toy_frozen("lora")
  adapters = nn.add_adapters(frozen, "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0), targets="l1|l2")
  init, step = train.make_train_step(toy_nll, train.make_optimizer(1e-2))
  b = batch()
  mask = np.zeros(b["inputs"].shape, np.float32)
  mask[:, :5] = 1
  _, metrics = jax.jit(step)(init(adapters), frozen, {**b, "mask": jnp.asarray(mask)}, jax.random.PRNGKey(0))
  expected = toy_nll(nn.combine(frozen, adapters), b["inputs"], b["targets"])[:, :5].mean()
  assert float(metrics["tokens"]) == mask.sum()
  assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_bad_schedule():
  with pytest.raises(ValueError, match="schedule='linear' is not supported; allowed: constant, cosine"):
    train.make_optimizer(1e-3, schedule="linear")


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, [1e-2, 1e-2, 1e-2, 1e-2]),
    ("constant", 2, [0.0, 5e-3, 1e-2, 1e-2]),  # a linear warmup from 0 over 2 updates
    ("cosine", 1, [0.0, 1e-2, 5e-3, 0.0]),  # then a cosine decay to 0 at total_steps = 3
])
def test_learning_rate_at_is_the_rate_of_that_update(schedule, warmup, expected):
  """The k-th AdamW update (k from 0) of a constant gradient, without clipping or decay, moves by its rate (Adam's
  normalised step of a constant gradient is 1, up to float32 rounding of the bias corrections)."""
  kwargs = dict(total_steps=3, warmup_steps=warmup, schedule=schedule)
  lr = train.step.learning_rate_schedule(1e-2, **kwargs)
  assert [train.step.learning_rate_at(lr, k) for k in range(4)] == pytest.approx(expected, abs=1e-9)
  optimizer = train.step.make_optimizer(1e-2, max_grad_norm=None, **kwargs)
  params = jnp.zeros(())
  state = optimizer.init(params)
  for k in range(4):
    updates, state = optimizer.update(jnp.ones(()), state, params)
    assert float(-updates) == pytest.approx(train.step.learning_rate_at(lr, k), rel=1e-4, abs=1e-9)


def test_adamw_follows_its_betas_and_eps():
  """Two AdamW steps against the update written out by hand (bias-corrected moments, m / (sqrt(v) + eps))."""
  lr, b1, b2, eps = 0.1, 0.5, 0.9, 0.3
  opt = train.make_optimizer(lr, max_grad_norm=None, b1=b1, b2=b2, eps=eps)
  w = {"w": jnp.asarray([1.0, -2.0])}
  state, m, v, expected = opt.init(w), np.zeros(2), np.zeros(2), np.array([1.0, -2.0])
  for t, g in enumerate(([0.5, -1.0], [2.0, 0.25]), start=1):
    g = np.asarray(g)
    updates, state = opt.update({"w": jnp.asarray(g)}, state, w)
    w = {"w": w["w"] + updates["w"]}
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    expected = expected - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(w["w"]), expected, rtol=1e-6)
