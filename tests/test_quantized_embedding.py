"""A token table stored quantized ([D, V] QTensor): the lookup, the tied head, and decoding with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import bench, models, quant
from qalora_jax.kernels import cpu_matmul

INT8 = quant.get("int", bits=8, group_size=32)


@pytest.fixture(scope="module")
def tiny():
  return models.tiny_model()


def test_the_table_is_quantized_transposed_and_looked_up_by_column(tiny):
  frozen, summary = models.quantize_params(tiny.params, [("embed/embedding", INT8)])
  table, qt = tiny.params["embed"]["embedding"], frozen["embed"]["embedding"]
  v, d = table.shape
  assert qt.shape == (d, v) and summary.bytes_after < summary.bytes_before
  tokens = jnp.asarray([[3, 200, 3], [0, v - 1, 17]])
  model = tiny.decoder(frozen)
  rows = model.embed(tokens, jnp.float32)
  np.testing.assert_array_equal(rows, np.asarray(qt.dequantize()).T[np.asarray(tokens)])
  # 8-bit codes per 32 inputs: each value within half a step (range / 255) of the float one
  assert float(jnp.max(jnp.abs(rows - table[tokens]))) <= float(np.ptp(table)) / 255 / 2 + 1e-4
  weight, vocab_first = model.head_weight()
  assert weight.shape == (d, v) and not vocab_first


def test_a_table_in_any_format_is_looked_up_as_its_dequantized_columns(tiny):
  """NF4 with double quantization holds arrays without a vocab axis (the absmax codebook's scale and offset)."""
  frozen, _ = models.quantize_params(tiny.params, [("embed/embedding", quant.get("nf4", double_quant=True))])
  qt = frozen["embed"]["embedding"]
  tokens = jnp.asarray([[5, 257, 0]])
  np.testing.assert_array_equal(tiny.decoder(frozen).embed(tokens, jnp.float32),
                                np.asarray(qt.dequantize()).T[np.asarray(tokens)])


def test_logits_with_a_quantized_table_equal_the_dequantized_float_model(tiny):
  frozen, _ = models.quantize_params(tiny.params, [("embed/embedding", INT8)])
  dequantized = {**tiny.params, "embed": {"embedding": frozen["embed"]["embedding"].dequantize().T}}
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 24)), jnp.int32)
  got = models.apply(tiny.config, frozen, tokens)
  want = models.apply(tiny.config, dequantized, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  targets = jnp.roll(tokens, -1, axis=1)
  np.testing.assert_allclose(models.nll(tiny.config, frozen, tokens, targets),
                             models.nll(tiny.config, dequantized, tokens, targets), rtol=1e-5)


def test_the_cpu_kernel_runs_the_quantized_head_like_its_reference():
  qt = INT8.quantize(np.random.default_rng(1).normal(size=(64, 272)).astype(np.float32))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 64)), jnp.float32)
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  assert cpu_matmul.supports(qt)
  got = models.layers.head_logits(x, qt, vocab_first=False, matmul_dtype="int8")
  np.testing.assert_allclose(got, cpu_matmul.reference(x, qt), rtol=1e-5, atol=1e-5)


def test_the_int8_heads_gradient_is_the_softmax_of_its_logits_times_the_float_weight():
  """dnll_t / dx_t = sum_v softmax(z_t)_v W_v - W_{y_t}, with z the int8 kernel's logits and W the float weight
  (the kernel has no transposed product)."""
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  qt = INT8.quantize(np.random.default_rng(1).normal(size=(64, 272)).astype(np.float32))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 64)), jnp.float32)
  targets = jnp.asarray([0, 7, 100, 271, 136], jnp.int32)
  g = jnp.asarray([1.0, -0.5, 2.0, 0.25, 0.0], jnp.float32)

  def loss(x):
    return (models.layers.head_nll(x, qt, targets, vocab_first=False, matmul_dtype="int8") * g).sum()

  z = models.layers.head_logits(x, qt, vocab_first=False, matmul_dtype="int8")
  w = qt.dequantize(jnp.float32)
  want = g[:, None] * (jax.nn.softmax(z, axis=-1) @ w.T - w[:, targets].T)
  np.testing.assert_allclose(jax.grad(loss)(x), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(loss(x), ((jax.nn.logsumexp(z, axis=-1) - z[jnp.arange(5), targets]) * g).sum(),
                             rtol=1e-5)


def test_decode_bench_with_an_int8_table_reads_fewer_bytes():
  float_run = bench.bench_decode(model="tiny", new_tokens=4, repeats=1, embedding="float")
  int8_run = bench.bench_decode(model="tiny", new_tokens=4, repeats=1, embedding="int8")
  table = 258 * 64
  assert float_run["bytes_per_token"] - int8_run["bytes_per_token"] == table * 4 - (table + 2 * 2 * table // 32)
  with pytest.raises(ValueError, match="embedding 'int4' is not supported; allowed: float, int8"):
    bench.bench_decode(model="tiny", embedding="int4")


@pytest.mark.real_model
def test_smollm2s_q8_0_table_is_kept_exactly(smollm2_gguf):
  """keep_quantized reads the released Q8_0 token table as an 8-bit [D, V] QTensor (a quarter of float32's
  bytes) whose values are the float loader's, bit for bit: training and decoding see the same numbers."""
  kept = models.load(smollm2_gguf, keep_quantized=True).params["embed"]["embedding"]
  table = models.load(smollm2_gguf).params["embed"]["embedding"]
  assert (kept.shape, kept.bits, kept.group_size) == (table.shape[::-1], 8, 32)
  assert kept.nbytes < 0.3 * table.nbytes
  np.testing.assert_array_equal(np.asarray(kept.dequantize()).T, np.asarray(table))


def test_projections_sharing_an_input_run_as_one_kernel_call_with_equal_results(tiny, monkeypatch):
  """With int8 matmuls, q/k/v (and gate/up) of an INT4 model go through one CPU kernel call (x quantized once);
  each output column is computed as in its own call, so nothing changes."""
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  frozen, _ = models.quantize_params(tiny.params, quant.get("int", bits=4, group_size=32))
  config = tiny.config.replace(matmul_dtype="int8")
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 258, (2, 12)), jnp.int32)
  calls = []
  real = cpu_matmul.matmul_shared
  monkeypatch.setattr(cpu_matmul, "matmul_shared", lambda x, ws: calls.append([w.shape for w in ws]) or real(x, ws))
  fused = models.apply(config, frozen, tokens)
  d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
  assert calls == [[(d, q), (d, kv), (d, kv)], [(q, d)], [(d, f), (d, f)], [(f, d)]]  # one block traced once
  from qalora_jax.nn import modules
  monkeypatch.setattr(modules, "shared_input",
                      lambda x, layers, rngs: [layer(x, dropout_rng=r) for layer, r in zip(layers, rngs)])
  from qalora_jax.models import llama
  monkeypatch.setattr(llama, "shared_input", modules.shared_input)
  calls.clear()
  separate = models.apply(config, frozen, tokens)
  assert len(calls) == 7 and all(len(ws) == 1 for ws in calls)
  np.testing.assert_array_equal(fused, separate)


def test_parameters_laid_out_for_the_kernel_decode_as_the_qtensors_do():
  """decoding_params lays every QTensor the kernel reads (the INT4 linears and the 8-bit tied table) out in
  strips, once; logits and generated tokens equal those of the QTensors laid out inside each call."""
  if not cpu_matmul.available():
    pytest.skip("the CPU kernel does not build here")
  from qalora_jax.models import generation, llama

  config = models.Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=32, matmul_dtype="int8", eos_ids=())
  params = llama.init_params(config, jax.random.PRNGKey(0), std=0.1)
  frozen = models.quantize.int8_table(models.quantize_params(params, quant.get("int", bits=4, group_size=32))[0])
  prepared = generation.decoding_params(config, frozen)
  is_weight = lambda x: isinstance(x, (quant.QTensor, cpu_matmul.Strips))  # noqa: E731
  weights = [leaf for leaf in jax.tree.leaves(prepared, is_leaf=is_weight) if is_weight(leaf)]
  assert [type(w) for w in weights] == [cpu_matmul.Strips] * (1 + 7 * 2)  # the table and 7 linears a layer
  again = generation.decoding_params(config, prepared)  # laid out already: kept as it is
  assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(prepared)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(llama.apply(config, prepared, tokens),
                                llama.apply(config, llama.unstack_blocks(frozen), tokens))
  stacked = cpu_matmul.prepare(frozen)  # the scanned layout reads strips too
  np.testing.assert_array_equal(llama.apply(config, stacked, tokens), llama.apply(config, frozen, tokens))
  lm = models.LanguageModel(config, frozen)
  prompts = [[5, 6, 7], [9, 10, 11, 12]]
  assert (generation.generate_tokens(lm, prompts, 6, params=prepared)
          == generation.generate_tokens(lm, prompts, 6, params=llama.unstack_blocks(frozen)))


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_matmul_options_are_checked_before_loading(command, capsys):
  from qalora_jax import cli

  extra = ["--prompt", "x"] if command == "generate" else []
  assert cli.main([command, "--model", "no-such-model", "--matmul-dtype", "int4", *extra]) == 2
  assert "--matmul-dtype 'int4' is not supported; allowed: float32, bfloat16, int8" in capsys.readouterr().err
  assert cli.main([command, "--model", "no-such-model", "--embedding", "q8", *extra]) == 2
  assert "--embedding 'q8' is not supported; allowed: float, int8" in capsys.readouterr().err
