"""`nf-offset`: the NF-k codebooks, the per-group scale and offset, QA-LoRA training and an exact merge on
the tiny model, bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qalora_jax import nn, quant
from qalora_jax.quant.nf4 import NF4_CODE
from qalora_jax.quant.nf_offset import nf_codebook
from qalora_jax.train import config as config_lib
from qalora_jax.train import experiment, loop


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks(bits):
  code = nf_codebook(bits)
  n = 2**bits
  assert code.dtype == np.float32 and code.shape == (n,)
  assert (np.diff(code) > 0).all() and code[0] == -1.0 and code[-1] == 1.0
  assert (code == 0).sum() == 1
  assert (code > 0).sum() == n // 2 and (code < 0).sum() == n // 2 - 1


def test_nf4_is_the_bitsandbytes_table():
  np.testing.assert_array_equal(nf_codebook(4), NF4_CODE)
  assert nf_codebook(4)[1] == np.float32(-0.6961928009986877)  # QLoRA's table, by hand
  assert nf_codebook(4)[14] == np.float32(0.7229568362236023)


def test_nf3_and_nf2_values():
  np.testing.assert_allclose(nf_codebook(2), [-1, 0, 0.43581823, 1], rtol=0, atol=1e-7)
  np.testing.assert_allclose(nf_codebook(3), [-1, -0.5350228, -0.24693148, 0, 0.18333748, 0.38199395, 0.62298584, 1],
                             rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 2])
def test_group_ends_and_midpoint(bits):
  w = (np.random.default_rng(bits).standard_t(4, size=(100, 8)) * 0.03).astype(np.float32)
  qt = quant.get("nf-offset", bits=bits, group_size=32, scale_dtype="float32").quantize(w)
  assert qt.format == "nf-offset" and qt["scale"].shape == qt["offset"].shape == (4, 8)
  assert quant.has_group_offset(qt)
  w_hat = np.asarray(qt.dequantize())
  groups = [slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 100)]  # the last group is short
  for l, rows in enumerate(groups):
    lo, hi = w[rows].min(axis=0), w[rows].max(axis=0)
    np.testing.assert_allclose(np.asarray(qt["offset"][l]), (hi + lo) / 2, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(qt["scale"][l]), (hi - lo) / 2, rtol=1e-6, atol=1e-9)
    # the group's extremes are reproduced (codes -1 and 1)
    np.testing.assert_allclose(w_hat[rows].min(axis=0), lo, rtol=0, atol=1e-7)
    np.testing.assert_allclose(w_hat[rows].max(axis=0), hi, rtol=0, atol=1e-7)


def test_qalora_trains_and_merges_exactly_on_the_tiny_model():
  """After real training steps, every merged layer equals its base plus the pooled adapter: each weight of
  group l moves by s (A B)[l] (float32 offsets: up to float32 rounding). Whole-model logits on SmolLM2:
  experiments/nf_offset_merge.py."""
  cfg = config_lib.load("configs/tiny.py", ["--config.base.quantizer=nf-offset", "--config.base.options.bits=3",
                                           "--config.base.options.scale_dtype=float32"])
  r = experiment.build(cfg, log=lambda m: None)
  state, _ = loop.train_steps(r, 2)
  merged = r.merged(state.trainable)
  layers = dict(nn.trees.linear_layers(r.base_params()))
  merged_layers = dict(nn.trees.linear_layers(merged))
  adapters = list(nn.trees.adapter_layers(r.adapters(state.trainable)))
  assert len(adapters) == 7
  dequantize = jax.jit(lambda qt: qt.dequantize())
  for path, adapter in adapters:
    base, after = layers[path]["kernel"], merged_layers[path]["kernel"]
    assert base.format == after.format == "nf-offset" and base.bits == 3 and after.nbytes == base.nbytes
    delta = nn.delta_weight(adapter)  # [layers, groups, out]
    assert float(jnp.abs(delta).max()) > 0  # trained
    expected = dequantize(base) + jnp.repeat(delta, base.group_size, axis=-2)[..., :base.shape[0], :]
    got = dequantize(after)
    assert float(jnp.abs(got - expected).max()) <= 1e-6 * float(jnp.abs(expected).max())


@pytest.mark.parametrize("options, message", [
    (dict(bits=5), "bits=5 is not supported; allowed: 2, 3, 4"),
    (dict(bits=1), "bits=1 is not supported; allowed: 2, 3, 4"),
    (dict(group_size=0), "group_size=0 is not supported; allowed: a positive integer or -1"),
    (dict(scale_dtype="float64"), "scale_dtype='float64' is not supported; allowed: float16, bfloat16, float32"),
    (dict(block_size=64), "unknown option 'block_size' for quantizer 'nf-offset'"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    quant.get("nf-offset", **options)
