"""Alpaca-style instruction data: JSON lines with "instruction", optional "input", and "output".

Each example becomes prompt + response tokens, where the prompt follows the Alpaca template and the loss
mask is 1 on the response tokens (and the closing end-of-sequence token) only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def read_instructions(path: str | Path) -> list[dict[str, str]]:
  """Parses a JSONL file; a malformed line or a missing field is an error naming the line number."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      if (not isinstance(obj, dict) or not isinstance(obj.get("instruction"), str)
          or not isinstance(obj.get("output"), str)):
        raise ValueError(f"{path}:{lineno}: each line needs string fields 'instruction' and 'output' "
                         f"(and optionally 'input')")
      examples.append({"instruction": obj["instruction"], "input": str(obj.get("input") or ""),
                       "output": obj["output"]})
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def format_prompt(example: dict[str, str]) -> str:
  has_input = bool(example.get("input"))
  return PROMPT.format(with_input=", paired with an input that provides further context" if has_input else "",
                       instruction=example["instruction"],
                       input_block=f"### Input:\n{example['input']}\n\n" if has_input else "")


def encode_instructions(examples, encode: Callable[[str], list[int]], seq_len: int, eos_id: int, pad_id: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(blocks [n, seq_len + 1], mask [n, seq_len + 1]): one example per row, truncated or padded; mask is 1
  on response tokens and the final EOS."""
  blocks = np.full((len(examples), seq_len + 1), pad_id, np.int32)
  mask = np.zeros((len(examples), seq_len + 1), np.int32)
  for i, ex in enumerate(examples):
    prompt = encode(format_prompt(ex))
    response = encode(ex["output"]) + [eos_id]
    ids = (prompt + response)[: seq_len + 1]
    blocks[i, : len(ids)] = ids
    mask[i, len(prompt): len(ids)] = 1
  return blocks, mask
