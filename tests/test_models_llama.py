"""The decoder on tiny random models: layouts, remat, padding, KV cache, quantized kernels, metrics, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models_testing import equations
from qalora_jax import models, quant
from qalora_jax.models import generation, layers, llama, metrics

CONFIG = models.Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_seq_len=64, rope_theta=500.0, eos_ids=(5,), pad_id=0)


def _lm(config=CONFIG, seed=0, std=0.2):
  return models.LanguageModel(config, llama.init_params(config, jax.random.PRNGKey(seed), std=std))


def _tokens(batch=2, seq=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(6, CONFIG.vocab_size, (batch, seq)), jnp.int32)


def test_dense_accepts_a_qtensor():
  w = jax.random.normal(jax.random.PRNGKey(1), (40, 24))
  qt = quant.get("int", bits=4, group_size=16).quantize(w)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 40))
  np.testing.assert_allclose(layers.dense(x, qt), x @ qt.dequantize(jnp.float32), rtol=1e-6, atol=1e-6)
  assert layers.dense(x.astype(jnp.bfloat16), qt).dtype == jnp.bfloat16


def test_scanned_unrolled_and_per_layer_layouts_agree():
  lm = _lm()
  tokens = _tokens()
  ref = lm(tokens)
  unrolled = lm.replace(config=CONFIG.replace(scan_layers=False))
  np.testing.assert_allclose(unrolled(tokens), ref, atol=1e-5)
  per_layer = llama.unstack_blocks(lm.params)
  assert sorted(per_layer["blocks"]) == ["0", "1", "2"]
  np.testing.assert_allclose(lm.apply(per_layer, tokens), ref, atol=1e-5)
  restacked = llama.stack_blocks(per_layer)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restacked, lm.params))
  assert "blocks/1/attn/q_proj/kernel" in models.param_paths(per_layer)
  assert "2" in llama.init_params(CONFIG.replace(scan_layers=False), jax.random.PRNGKey(0))["blocks"]


def test_remat_keeps_values_and_gradients():
  lm = _lm()
  tokens = _tokens()

  def loss(params, config):
    logits = llama.apply(config, params, tokens)
    return metrics.token_nll(logits[:, :-1], tokens[:, 1:]).mean()

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  for scan in (True, False):
    plain = CONFIG.replace(scan_layers=scan)
    v0, g0 = grad(lm.params, plain)
    for keep in ("", "qkv", "mlp", "qkv,mlp") if scan else ("", "qkv,mlp"):
      v1, g1 = grad(lm.params, plain.replace(remat=True, remat_keep=keep))
      np.testing.assert_allclose(v0, v1, rtol=1e-6)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_remat_keep_recomputes_fewer_projections():
  """Each kept activation takes its projections out of the backward pass's recomputation: fewer matmuls in the
  gradient's program, "qkv" three a layer, "mlp" two."""
  lm = _lm()
  tokens = _tokens()

  def dots(keep):
    config = CONFIG.replace(remat=True, remat_keep=keep)
    loss = lambda p: llama.apply(config, p, tokens).sum()  # noqa: E731
    return sum(e.primitive.name == "dot_general" for e in equations(jax.make_jaxpr(jax.grad(loss))(lm.params).jaxpr))

  none, qkv, mlp, both = dots(""), dots("qkv"), dots("mlp"), dots("qkv,mlp")
  assert none - qkv == 3 and none - mlp == 2 and none - both == 5
  with pytest.raises(ValueError, match=r"remat_keep='attn' is not supported; allowed: '', qkv, mlp, qkv,mlp"):
    CONFIG.replace(remat_keep="attn")


def test_bfloat16_compute_is_close_to_float32():
  lm = _lm()
  tokens = _tokens()
  ref = lm(tokens)
  low = lm.replace(config=CONFIG.replace(dtype="bfloat16"))(tokens)
  assert low.dtype == jnp.float32
  assert float(jnp.abs(low - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_left_padding_does_not_change_a_row():
  lm = _lm()
  row = _tokens(1, 9, seed=3)
  padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), row], axis=1)
  mask = jnp.arange(13)[None] >= 4
  np.testing.assert_allclose(lm(padded, padding_mask=mask)[:, 4:], lm(row), atol=1e-5)


def test_kv_cache_decoding_matches_the_full_forward_pass():
  forward = jax.jit(llama.forward, static_argnums=0)
  for config in (CONFIG, CONFIG.replace(sliding_window=4)):
    lm = _lm(config)
    tokens = _tokens(2, 10, seed=4)
    full = lm(tokens)
    for per_layer in (False, True):
      params = llama.unstack_blocks(lm.params) if per_layer else lm.params
      cache = llama.init_cache(config, 2, 10, per_layer=per_layer)
      key_mask = jnp.zeros((2, 10), bool).at[:, :6].set(True)
      pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
      logits, cache = forward(config, params, tokens[:, :6], pos[:, :6], key_mask, cache, 0)
      steps = [logits]
      for i in range(6, 10):
        key_mask = key_mask.at[:, i].set(True)
        logits, cache = forward(config, params, tokens[:, i:i + 1], pos[:, i:i + 1], key_mask, cache, i)
        steps.append(logits)
      np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_greedy_batch_with_padding_equals_one_prompt_at_a_time():
  lm = _lm(CONFIG.replace(eos_ids=()))
  prompts = [[7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20]]
  batch = models.generate_tokens(lm, prompts, max_new_tokens=8)
  assert [len(t) for t in batch] == [8, 8, 8]
  assert batch == [models.generate_tokens(lm, [p], max_new_tokens=8)[0] for p in prompts]
  # The tokens follow the greedy argmax of the full forward pass.
  seq = prompts[1] + batch[1]
  logits = lm(jnp.asarray([seq]))
  assert list(np.asarray(jnp.argmax(logits[0, len(prompts[1]) - 1:-1], -1))) == batch[1]


def test_generation_stops_at_eos():
  lm = _lm(CONFIG.replace(eos_ids=()))
  prompt = [[7, 8, 9]]
  free = models.generate_tokens(lm, prompt, max_new_tokens=10)[0]
  stop = free[3]
  stopped = models.generate_tokens(lm.replace(config=CONFIG.replace(eos_ids=(stop,))), prompt, max_new_tokens=10)[0]
  assert stopped == free[:free.index(stop)]


def test_sampling_is_seeded_and_top_p_narrows_the_choice():
  lm = _lm(CONFIG.replace(eos_ids=()))
  prompts = [[7, 8, 9], [30, 31]]
  a = models.generate_tokens(lm, prompts, 12, temperature=1.0, seed=1)
  assert a == models.generate_tokens(lm, prompts, 12, temperature=1.0, seed=1)
  assert a != models.generate_tokens(lm, prompts, 12, temperature=1.0, seed=2)
  greedy = models.generate_tokens(lm, prompts, 12)
  assert models.generate_tokens(lm, prompts, 12, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_choose_tokens_top_p_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  picks = {int(generation.choose_tokens(logits, jax.random.PRNGKey(i), 1.0, 0.75, False)[0]) for i in range(200)}
  assert picks == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
  picks = {int(generation.choose_tokens(logits, jax.random.PRNGKey(i), 1.0, 1.0, False)[0]) for i in range(400)}
  assert picks == {0, 1, 2, 3}


def test_greedy_tokens_are_numpys_argmax_ties_included():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 5, size=(64, 37)).astype(np.float32)  # many ties: the first maximum wins
  np.testing.assert_array_equal(np.asarray(generation.first_max(jnp.asarray(logits))), logits.argmax(-1))
  assert generation.first_max(jnp.full((1, 7), jnp.nan)).tolist() == [6]  # still a token id


def test_generation_errors():
  lm = _lm()
  with pytest.raises(ValueError, match=r"prompt 1 has 60 tokens, which with max_new_tokens=8 exceeds the context "
                                       r"length max_seq_len=64"):
    models.generate_tokens(lm, [[7], [7] * 60], max_new_tokens=8)
  with pytest.raises(ValueError, match=r"prompt 0 is empty"):
    models.generate_tokens(lm, [[]], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"temperature=-1 is not supported; allowed: a number >= 0"):
    models.generate_tokens(lm, [[7]], max_new_tokens=2, temperature=-1)
  with pytest.raises(ValueError, match=r"top_p=0 is not supported; allowed: a number in \(0, 1\]"):
    models.generate_tokens(lm, [[7]], max_new_tokens=2, temperature=1, top_p=0)
  with pytest.raises(ValueError, match=r"max_new_tokens=0 is not supported"):
    models.generate_tokens(lm, [[7]], max_new_tokens=0)


def test_apply_rejects_a_sequence_longer_than_the_context():
  lm = _lm()
  with pytest.raises(ValueError, match=r"sequence of 65 tokens exceeds the context length max_seq_len=64"):
    lm(jnp.zeros((1, 65), jnp.int32))


def test_config_errors():
  with pytest.raises(ValueError, match=r"arch='gpt2' is not supported; allowed: llama, mistral, qwen2"):
    CONFIG.replace(arch="gpt2")
  with pytest.raises(ValueError, match=r"dtype='float16' is not supported; allowed: float32, bfloat16"):
    CONFIG.replace(dtype="float16")
  with pytest.raises(ValueError, match=r"num_heads=4 is not a multiple of num_kv_heads=3"):
    CONFIG.replace(num_kv_heads=3)


def test_unknown_model_name():
  with pytest.raises(ValueError, match=r"model='smollm3' is not supported; allowed: smollm2-135m, a \.gguf file, "
                                       r"a Hugging Face model directory, or a saved model directory"):
    models.load("smollm3")


def test_quantize_params_default_rules_and_scan():
  lm = _lm()
  q = quant.get("int", bits=4, group_size=24)  # 24 divides neither 32 nor 64: short last groups
  frozen, summary = models.quantize_params(lm.params, q)
  kernel = frozen["blocks"]["attn"]["q_proj"]["kernel"]
  assert isinstance(kernel, quant.QTensor) and kernel.shape == (32, 32)
  assert kernel["scale"].shape[0] == 3  # stacked over the layers
  assert not isinstance(frozen["embed"]["embedding"], quant.QTensor)
  assert not isinstance(frozen["lm_head"]["kernel"], quant.QTensor)
  (rule,) = summary.rules
  assert (rule.tensors, rule.matrices) == (7, 21)
  assert summary.bytes_after < summary.bytes_before
  assert summary.bytes_before == sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(lm.params))
  assert "total" in str(summary)
  # The quantized model equals the float model with the dequantized weights, scanned or not.
  deq = jax.tree.map(lambda x: x, frozen, is_leaf=lambda x: isinstance(x, quant.QTensor))
  for path in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
               "mlp/down_proj"):
    group, name = path.split("/")
    qt = frozen["blocks"][group][name]["kernel"]
    deq["blocks"][group][name]["kernel"] = qt.dequantize()  # [L, in, out]
  tokens = _tokens()
  ref = lm.apply(deq, tokens)
  np.testing.assert_allclose(lm.apply(frozen, tokens), ref, atol=1e-5)
  np.testing.assert_allclose(lm.replace(config=CONFIG.replace(scan_layers=False)).apply(frozen, tokens), ref, atol=1e-5)
  np.testing.assert_allclose(lm.apply(llama.unstack_blocks(frozen), tokens), ref, atol=1e-5)
  assert len(models.generate_tokens(lm.replace(params=frozen), [[7, 8]], max_new_tokens=3)[0]) <= 3


def test_quantize_params_rules():
  lm = _lm()
  rules = [(r"blocks/mlp/.*/kernel", quant.get("nf4", block_size=32)),
           (r"blocks/attn/o_proj/kernel", None),
           (r"blocks/attn/.*/kernel", quant.get("int", bits=3, group_size=16)),
           (r"lm_head/kernel", quant.get("int", bits=8, group_size=32))]
  frozen, summary = models.quantize_params(lm.params, rules)
  assert frozen["blocks"]["mlp"]["up_proj"]["kernel"].format == "nf4"
  assert not isinstance(frozen["blocks"]["attn"]["o_proj"]["kernel"], quant.QTensor)
  assert frozen["blocks"]["attn"]["q_proj"]["kernel"].bits == 3
  assert frozen["lm_head"]["kernel"].shape == (32, 97)
  assert [r.tensors for r in summary.rules] == [3, 1, 3, 1]
  assert summary.rules[1].bytes_before == summary.rules[1].bytes_after
  assert np.isfinite(np.asarray(lm.apply(frozen, _tokens()))).all()
  # Per-layer layout: rules may pick single layers.
  frozen, _ = models.quantize_params(llama.unstack_blocks(lm.params),
                                     [(r"blocks/1/mlp/.*/kernel", quant.get("int", group_size=16))])
  assert isinstance(frozen["blocks"]["1"]["mlp"]["up_proj"]["kernel"], quant.QTensor)
  assert not isinstance(frozen["blocks"]["0"]["mlp"]["up_proj"]["kernel"], quant.QTensor)


def test_quantize_params_errors():
  lm = _lm()
  with pytest.raises(ValueError, match=r"rule 'blocks/nothing' matches no parameter"):
    models.quantize_params(lm.params, [("blocks/nothing", quant.get("int"))])
  with pytest.raises(ValueError, match=r"rule 'final_norm/scale' matched final_norm/scale of shape \[32\]"):
    models.quantize_params(lm.params, [("final_norm/scale", quant.get("int"))])
  with pytest.raises(ValueError, match=r"rules\[0\]="):
    models.quantize_params(lm.params, [("blocks/.*", "int")])
  frozen, _ = models.quantize_params(lm.params, quant.get("int", group_size=16))
  with pytest.raises(ValueError, match=r"rule '.*' matches only weights that are quantized already, e.g. "
                                       r"blocks/attn/q_proj/kernel \(int 4-bit, group 16\)"):
    models.quantize_params(frozen, quant.get("int", bits=3, group_size=16))


def test_token_nll_and_perplexity():
  logits = jnp.log(jnp.asarray([[[0.25, 0.75], [0.5, 0.5]]]))
  np.testing.assert_allclose(metrics.token_nll(logits, jnp.asarray([[1, 0]])), [[-np.log(0.75), np.log(2)]], rtol=1e-6)
  lm = _lm()
  uniform = lm.replace(params={**lm.params, "lm_head": {"kernel": jnp.zeros((32, 97))}})
  ids = np.random.default_rng(0).integers(0, 97, 50)
  assert models.perplexity(uniform, ids, window=16, batch_size=2) == pytest.approx(97, rel=1e-5)
  with pytest.raises(ValueError, match=r"fewer than one window"):
    models.perplexity(uniform, ids[:10], window=16)


def test_adapters_plug_into_the_model():
  from qalora_jax import nn

  lm = _lm()
  frozen, _ = models.quantize_params(lm.params, quant.get("int", bits=4, group_size=16))
  tokens = _tokens()
  base = lm.apply(frozen, tokens)
  for method in ("lora", "qalora"):
    adapters = nn.add_adapters(frozen, method, rank=2, alpha=4.0, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(lm.apply(nn.combine(frozen, adapters), tokens), base, atol=1e-5)  # B = 0

    def loss(adapters):
      logits = lm.apply(nn.combine(frozen, adapters), tokens)
      return metrics.token_nll(logits[:, :-1], tokens[:, 1:]).mean()

    grads = jax.grad(loss)(adapters)
    b_grad = grads["blocks"]["attn"]["q_proj"]["adapter"].b
    assert b_grad.shape[0] == 3 and float(jnp.abs(b_grad).max()) > 0


def test_leaves_written_to_safetensors_load_back_bit_for_bit(tmp_path):
  """models.quantize.save_leaves / load_leaves (cached bases and saved model directories): QTensors of several
  formats and scale dtypes, and plain arrays, come back with their dtypes, values and QMeta."""
  from qalora_jax.models.quantize import load_leaves, save_leaves

  w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
  leaves = {"a/int4": quant.get("int", bits=4, group_size=32, scale_dtype="bfloat16").quantize(w),
            "a/nf4": quant.get("nf4", block_size=64, double_quant=True).quantize(w),
            "b/float": jnp.asarray(w, jnp.bfloat16), "b/ids": jnp.arange(5, dtype=jnp.int32)}
  save_leaves(tmp_path / "leaves.safetensors", leaves)
  back = load_leaves(tmp_path / "leaves.safetensors")
  assert sorted(back) == sorted(leaves)
  for p, leaf in leaves.items():
    if isinstance(leaf, quant.QTensor):
      assert back[p].meta == leaf.meta and sorted(back[p].arrays) == sorted(leaf.arrays)
      pairs = [(back[p][k], a) for k, a in leaf.arrays.items()]
    else:
      pairs = [(back[p], leaf)]
    for got, want in pairs:
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
