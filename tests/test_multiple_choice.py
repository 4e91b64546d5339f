"""The MMLU-format few-shot evaluator on a small hand-written set."""

from pathlib import Path

import numpy as np
import pytest

from qalora_jax.eval import multiple_choice as mc

DATA = Path(__file__).parent / "data" / "mmlu"
ANSWERS = {"Prospero": "C", "To be": "A", "fairy": "D", "2 + 2": "B"}


def char_encode(text):
  return [ord(c) for c in text]


def logits_answering(rule):
  """A stand-in model: reads the last question of the prompt and puts the largest logit on rule(question)."""
  def next_token_logits(ids):
    prompt = "".join(map(chr, ids))
    question = prompt.rsplit("\n\n", 1)[-1]
    logits = np.zeros(128)
    logits[ord(rule(question))] = 1.0
    return logits
  return next_token_logits


def oracle(question):
  return next(letter for key, letter in ANSWERS.items() if key in question)


def test_prompt_format_by_hand():
  shots = [("Who wrote Hamlet?", ["William Shakespeare", "Christopher Marlowe", "Ben Jonson", "John Webster"], "A")]
  prompt = mc.build_prompt("shakespeare_plays", shots, "Q?", ["w", "x", "y", "z"])
  assert prompt == ("The following are multiple choice questions (with answers) about shakespeare plays.\n\n"
                    "Who wrote Hamlet?\nA. William Shakespeare\nB. Christopher Marlowe\nC. Ben Jonson\n"
                    "D. John Webster\nAnswer: A\n\nQ?\nA. w\nB. x\nC. y\nD. z\nAnswer:")


def test_accuracy_of_an_oracle_and_of_always_a():
  result = mc.evaluate(logits_answering(oracle), char_encode, DATA, k_shot=2)
  assert result == {"accuracy": 1.0, "n": 4, "per_subject": {"arithmetic": 1.0, "shakespeare_plays": 1.0}}
  always_a = mc.evaluate(logits_answering(lambda q: "A"), char_encode, DATA, k_shot=2)
  assert always_a["accuracy"] == pytest.approx(1 / 4)  # one of the four answers is A
  assert always_a["per_subject"]["shakespeare_plays"] == pytest.approx(1 / 3)


def test_shots_are_dropped_to_fit_the_context():
  seen = []

  def record(ids):
    seen.append(len(ids))
    return np.zeros(128)

  mc.evaluate(record, char_encode, DATA, k_shot=2, max_len=200, subjects=["shakespeare_plays"])
  assert max(seen) <= 200


def test_malformed_rows_name_the_line(tmp_path):
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq,a,b,c,d,E\n")
  with pytest.raises(ValueError, match=r"x_test.csv:2: expected 6 columns .* answer 'E'"):
    mc.evaluate(logits_answering(oracle), char_encode, tmp_path)
  with pytest.raises(ValueError, match="no test/<subject>_test.csv files"):
    mc.evaluate(logits_answering(oracle), char_encode, tmp_path / "test")
