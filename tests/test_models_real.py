"""SmolLM2-135M from its GGUF against transformers' LlamaForCausalLM loaded from the same file: logits, greedy
continuations, tokenizer and held-out perplexity."""

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from qalora_jax import assets, models  # noqa: E402

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gguf_path():
  return assets.fetch("smollm2-135m")


@pytest.fixture(scope="module")
def ours(gguf_path):
  return models.load("smollm2-135m")


@pytest.fixture(scope="module")
def theirs(smollm2_transformers):
  return smollm2_transformers


@pytest.fixture(scope="module")
def their_tokenizer(gguf_path):
  return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def play():
  return (Path(assets.fetch("shakespeare")) / "romances" / "the-tempest.md").read_text()


def test_logits_match_transformers(ours, theirs, play):
  starts = [0, 20000, 60000]
  prompts = [ours.tokenizer.encode(play[s:s + 2000])[:96] for s in starts]
  worst = 0.0
  for ids in prompts:
    assert len(ids) == 96
    got = np.asarray(ours(jnp.asarray([ids])))
    with torch.no_grad():
      want = theirs(torch.tensor([ids])).logits.numpy()
    worst = max(worst, float(np.abs(got - want).max()))
  print(f"SmolLM2 fp32 max |logit diff| vs transformers: {worst:.2e}")
  assert worst <= 1e-3


def test_greedy_continuations_match_transformers(ours, theirs):
  prompts = ["The capital of France is", "Once upon a time, in a small village,",
             "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"]
  ids = [ours.tokenizer.encode(p) for p in prompts]
  got = models.generate_tokens(ours, ids, max_new_tokens=20)
  eos = ours.config.eos_ids[0]
  for prompt, new in zip(ids, got):
    with torch.no_grad():
      want = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(prompt):].tolist()
    want = want[:want.index(eos)] if eos in want else want
    assert new == want
  assert models.generate(ours, ["The capital of France is"], max_new_tokens=3)[0].strip().startswith("Paris")


def test_tokenizer_matches_transformers(ours, their_tokenizer, play):
  texts = ["Hello world!", "  leading spaces,   runs   of spaces\n\n\n\tand\ttabs  ",
           "digits 0 12 345 6789 3.14159 1,000,000 2024-06-01", "naïve café déjà vu — “quotes” ‘single’ …",
           "日本語のテキスト, 中文, 한국어, Ελληνικά, русский", "emoji 🤖🎉👍🏽 and symbols ∑∫√ ≠ ≤",
           "<|im_start|>system\nYou are helpful.<|im_end|>\n", "don't I'll we've they're", play[:3000]]
  for text in texts:
    ids = ours.tokenizer.encode(text)
    assert ids == their_tokenizer.encode(text, add_special_tokens=True), text[:40]
    assert ours.tokenizer.decode(ids) == text


def _their_perplexity(model, ids, window):
  n = len(ids) // window
  total = 0.0
  for w in range(n):
    chunk = torch.tensor([ids[w * window:(w + 1) * window]])
    with torch.no_grad():
      logits = model(chunk).logits[0, :-1].double()
    total += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
  return math.exp(total / (n * (window - 1)))


def test_perplexity_matches_transformers(ours, theirs, play):
  ids = ours.tokenizer.encode(play)[:1024]
  got = models.perplexity(ours, ids, window=512)
  want = _their_perplexity(theirs, ids, 512)
  print(f"The Tempest, first 1024 tokens, 512-token windows: perplexity ours {got:.6f}, transformers {want:.6f}, "
        f"relative difference {abs(got - want) / want:.1e}")
  assert abs(got - want) / want <= 1e-3


def _their_peft_logits(base, adapter_dir, ids):
  import copy

  peft = pytest.importorskip("peft")
  model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
  with torch.no_grad():
    return model(torch.tensor([ids])).logits.numpy()


def test_peft_export_loads_in_peft_with_the_same_logits(ours, theirs, play, tmp_path):
  """LoRA adapters trained here for a few steps, exported, loaded with transformers + PEFT."""
  import jax

  from qalora_jax import nn, train
  from qalora_jax.export import peft as peft_io

  adapters = nn.add_adapters(ours.params, "lora", rank=4, alpha=8, key=jax.random.PRNGKey(0))
  ids = ours.tokenizer.encode(play[:3000])[:65]
  batch = {"inputs": jnp.asarray([ids[:-1]]), "targets": jnp.asarray([ids[1:]])}
  nll_fn = lambda p, x, y, dropout_rng=None: models.nll(ours.config, p, x, y)  # noqa: E731
  init, step = train.make_train_step(nll_fn, train.make_optimizer(1e-2))
  state = init(adapters)
  step = jax.jit(step)
  for i in range(3):
    state, _ = step(state, ours.params, batch, jax.random.PRNGKey(i))
  assert float(jnp.abs(state.trainable["blocks"]["attn"]["q_proj"]["adapter"].b).max()) > 0
  peft_io.export_peft(state.trainable, tmp_path / "adapter", base_model="smollm2-135m")
  got = np.asarray(ours.apply(nn.combine(ours.params, state.trainable), jnp.asarray([ids])))
  want = _their_peft_logits(theirs, tmp_path / "adapter", ids)
  print(f"PEFT round trip, max |logit diff|: {np.abs(got - want).max():.2e}")
  assert np.abs(got - want).max() <= 1e-3


def test_adapters_made_by_peft_import_with_the_same_logits(ours, theirs, play, tmp_path):
  import copy

  peft = pytest.importorskip("peft")
  from qalora_jax import nn
  from qalora_jax.export import peft as peft_io

  torch.manual_seed(0)
  config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  model = peft.get_peft_model(copy.deepcopy(theirs), config)
  model.save_pretrained(str(tmp_path / "made-by-peft"))
  adapters = peft_io.import_peft(tmp_path / "made-by-peft", ours.params)
  ids = ours.tokenizer.encode(play[5000:8000])[:64]
  got = np.asarray(ours.apply(nn.combine(ours.params, adapters), jnp.asarray([ids])))
  with torch.no_grad():
    want = model.eval()(torch.tensor([ids])).logits.numpy()
  print(f"PEFT import, max |logit diff|: {np.abs(got - want).max():.2e}")
  assert np.abs(got - want).max() <= 1e-3
