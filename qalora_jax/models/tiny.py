"""The tests' model: a 2-block random LLaMA over bytes, built in a second; `model.name = "tiny"` in a config."""

from __future__ import annotations

import jax

from qalora_jax.models.config import Config
from qalora_jax.models.llama import init_params
from qalora_jax.models.lm import LanguageModel
from qalora_jax.models.tokenizer import Tokenizer


def tiny_model(seed: int = 0, max_seq_len: int = 256) -> LanguageModel:
  """A 2-block random LLaMA over bytes (vocab 256 + BOS + EOS): the tests' model."""
  import tokenizers
  from tokenizers import decoders, pre_tokenizers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
  vocab.update({"<s>": 256, "</s>": 257})
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(["<s>", "</s>"])
  config = Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=max_seq_len, tie_embeddings=True,
                         bos_id=256, eos_ids=(257,))
  params = init_params(config, jax.random.PRNGKey(seed))
  return LanguageModel(config, params, Tokenizer(backend, bos_id=256, eos_ids=(257,)))
