"""Few-shot multiple choice in the MMLU format (Hendrycks et al.): CSV rows of question, four choices and
the answer letter, in <dir>/dev/<subject>_dev.csv (the shots) and <dir>/test/<subject>_test.csv.

The prompt for a test question is

    The following are multiple choice questions (with answers) about <subject words>.\\n\\n
    <shot 1>...<shot k><question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer:

with each shot written the same way followed by " <letter>\\n\\n". The model's choice is the letter among
" A", " B", " C", " D" with the largest next-token logit. Shots are dropped from the end while the prompt
is longer than the context.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

LETTERS = ("A", "B", "C", "D")


def read_csv(path: Path) -> list[tuple[str, list[str], str]]:
  """(question, [four choices], answer letter) rows; a malformed row is an error naming its line."""
  rows = []
  with open(path, newline="", encoding="utf-8") as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      if len(row) != 6 or row[5].strip() not in LETTERS:
        raise ValueError(f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer in A-D), "
                         f"got {len(row)} columns{'' if len(row) != 6 else f' and answer {row[5]!r}'}")
      rows.append((row[0], row[1:5], row[5].strip()))
  return rows


def format_question(question: str, choices: Sequence[str], answer: str | None = None) -> str:
  text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)) + "\nAnswer:"
  return text + (f" {answer}\n\n" if answer else "")


def build_prompt(subject: str, shots, question: str, choices: Sequence[str]) -> str:
  header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
  return header + "".join(format_question(q, c, a) for q, c, a in shots) + format_question(question, choices)


def evaluate(next_token_logits: Callable[[list[int]], np.ndarray], encode: Callable[[str], list[int]],
             directory: str | Path, k_shot: int = 5, max_len: int | None = None,
             subjects: Sequence[str] | None = None) -> dict:
  """Accuracy overall and per subject. `next_token_logits(ids)` gives the logits [vocab] after `ids`."""
  directory = Path(directory)
  tests = sorted((directory / "test").glob("*_test.csv"))
  if subjects:
    tests = [t for t in tests if t.name[: -len("_test.csv")] in subjects]
  if not tests:
    raise ValueError(f"{directory}: no test/<subject>_test.csv files")
  letter_ids = [encode(f" {letter}")[-1] for letter in LETTERS]
  per_subject, correct, total = {}, 0, 0
  for test in tests:
    subject = test.name[: -len("_test.csv")]
    dev = directory / "dev" / f"{subject}_dev.csv"
    shots = read_csv(dev)[:k_shot] if dev.exists() and k_shot else []
    hits = 0
    rows = read_csv(test)
    for question, choices, answer in rows:
      k = len(shots)
      ids = encode(build_prompt(subject, shots[:k], question, choices))
      while max_len is not None and len(ids) > max_len and k > 0:
        k -= 1
        ids = encode(build_prompt(subject, shots[:k], question, choices))
      if max_len is not None and len(ids) > max_len:
        raise ValueError(f"{test}: a question is longer than the context ({len(ids)} > {max_len} tokens)")
      logits = np.asarray(next_token_logits(ids))
      hits += LETTERS[int(np.argmax(logits[letter_ids]))] == answer
    per_subject[subject] = hits / len(rows)
    correct, total = correct + hits, total + len(rows)
  return {"accuracy": correct / total, "n": total, "per_subject": per_subject}


def model_logits_fn(lm, params=None) -> Callable[[list[int]], np.ndarray]:
  """next_token_logits for a LanguageModel (one prompt at a time)."""
  import jax.numpy as jnp

  params = lm.params if params is None else params
  return lambda ids: np.asarray(lm.apply(params, jnp.asarray([ids]))[0, -1])
