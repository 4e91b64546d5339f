"""Tokenizers from a GGUF file's metadata or a Hugging Face tokenizer.json, on the `tokenizers` library.

A GGUF stores a byte-level BPE vocabulary ("tokenizer.ggml.model" = "gpt2") as its tokens, merges and token
types, and names the pre-tokenizer ("tokenizer.ggml.pre") that splits text before the merges apply. The split
rules below follow llama.cpp's definitions of those names. For "smollm" that means every numeric character
alone, as SmolLM2's own tokenizer.json does (a Digits pre-tokenizer); transformers' GGUF tokenizer omits that
step, which agrees on ASCII digits (the vocabulary has no multi-digit tokens) but not on other numeric
characters such as "½" or "²".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# GPT-2's split: contractions, letters, numbers, other symbols, whitespace.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# LLaMA-3 (tiktoken cl100k): numbers in runs of up to three digits.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: as LLaMA-3, but every digit alone.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regular expressions applied in turn (each match isolated), before byte-level BPE.
GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    # SmolLM, StarCoder: every numeric character alone, then GPT-2's split.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
GGUF_TOKENIZER_MODELS = ("gpt2",)
_CONTROL = 3  # llama.cpp token type of special tokens such as <|im_end|>
_USER_DEFINED = 4


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> token ids. `encode` adds BOS when the model expects it; `decode` keeps special tokens unless
  asked to skip them."""

  backend: tokenizers.Tokenizer
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size()


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], splits: Sequence[str],
                   special: Sequence[str] = (), added: Sequence[str] = ()) -> tokenizers.Tokenizer:
  """Byte-level BPE whose pre-tokenizer isolates each match of `splits` in turn, then maps bytes to symbols."""
  vocab = {token: i for i, token in enumerate(tokens)}
  bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
  tok = tokenizers.Tokenizer(bpe)
  steps = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits]
  tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  if special:
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
  if added:
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
  return tok


def from_gguf_metadata(meta: Mapping[str, object]) -> Tokenizer:
  """The tokenizer a GGUF file describes (metadata as {key: python value})."""
  model = meta.get("tokenizer.ggml.model")
  if model not in GGUF_TOKENIZER_MODELS:
    raise ValueError(f"tokenizer.ggml.model={model!r} is not supported; allowed: {', '.join(GGUF_TOKENIZER_MODELS)}")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in GGUF_PRE_SPLITS:
    raise ValueError(f"tokenizer.ggml.pre={pre!r} is not supported; allowed: {', '.join(sorted(GGUF_PRE_SPLITS))}")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  special = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
  added = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
  backend = byte_level_bpe(tokens, list(meta["tokenizer.ggml.merges"]), GGUF_PRE_SPLITS[pre], special, added)
  bos = meta.get("tokenizer.ggml.bos_token_id")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
  return Tokenizer(backend, bos_id=_opt_int(bos), eos_ids=() if eos is None else (int(eos),),
                   pad_id=_opt_int(meta.get("tokenizer.ggml.padding_token_id")))


def from_hf_dir(path: str | Path, bos_id: int | None = None, eos_ids: Sequence[int] = (),
                pad_id: int | None = None) -> Tokenizer | None:
  """The tokenizer.json of a Hugging Face model directory (None when there is none). Special ids come from
  the arguments (config.json), else from tokenizer_config.json's token strings."""
  path = Path(path)
  if not (path / "tokenizer.json").is_file():
    return None
  backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  cfg_file = path / "tokenizer_config.json"
  cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

  def token_id(name):
    value = cfg.get(name)
    if isinstance(value, dict):
      value = value.get("content")
    return backend.token_to_id(value) if isinstance(value, str) else None

  bos_id = bos_id if bos_id is not None else token_id("bos_token")
  eos_ids = tuple(eos_ids) or tuple(i for i in [token_id("eos_token")] if i is not None)
  pad_id = pad_id if pad_id is not None else token_id("pad_token")
  return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id)


def _opt_int(x) -> int | None:
  return None if x is None else int(x)
