"""Data: packing, (seed, step)-pure batches, the play split, instruction JSONL and its loss mask."""

import json

import numpy as np
import pytest

from qalora_jax import data
from qalora_jax.data import batches, instructions


def test_pack_blocks_by_hand():
  blocks = data.pack_blocks([[1, 2, 3], [4, 5]], seq_len=2, eos_id=0)
  np.testing.assert_array_equal(blocks, [[1, 2, 3], [0, 4, 5]])  # stream 1 2 3 0 4 5 0, tail dropped
  with pytest.raises(ValueError, match="fewer than one block"):
    data.pack_blocks([[1]], seq_len=8, eos_id=0)


def test_batches_are_pure_and_cover_each_epoch_once():
  blocks = np.arange(10 * 5).reshape(10, 5)
  assert all((data.batch_at(blocks, 3, 7, s)["inputs"] == data.batch_at(blocks, 3, 7, s)["inputs"]).all()
             for s in range(6))
  seen = np.concatenate([batches.batch_indices(10, 2, seed=7, step=s) for s in range(5)])  # one epoch
  assert sorted(seen) == list(range(10))
  assert not (batches.batch_indices(10, 2, 7, 0) == batches.batch_indices(10, 2, 8, 0)).all()
  b = data.batch_at(blocks, 4, 0, 3)
  np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])


def test_play_split(tmp_path):
  for play in ("comedies/a", "romances/the-tempest", "tragedies/b"):
    (tmp_path / play).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{play}.md").write_text(play)
  train, held = data.split_plays(data.load_plays(tmp_path))
  assert list(train) == ["comedies/a", "tragedies/b"] and list(held) == ["romances/the-tempest"]
  with pytest.raises(ValueError, match=r"held-out plays \['x/y'\] are not in the corpus"):
    data.split_plays(data.load_plays(tmp_path), heldout=("x/y",))
  with pytest.raises(ValueError, match="holds no .md plays"):
    data.load_plays(tmp_path / "comedies" / "nothing-here")


def test_instruction_reader_reports_line_numbers(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n" + "{not json\n")
  with pytest.raises(ValueError, match=r"train.jsonl:2: malformed JSON"):
    data.read_instructions(path)
  path.write_text(json.dumps({"instruction": "Say hi"}) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1: each line needs string fields 'instruction' and 'output'"):
    data.read_instructions(path)


def test_instruction_mask_covers_the_response_only(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"instruction": "Add", "input": "2 2", "output": "4"}) + "\n")
  examples = data.read_instructions(path)
  encode = lambda text: [ord(c) for c in text]  # noqa: E731  (a character "tokenizer")
  prompt = instructions.format_prompt(examples[0])
  assert "### Input:\n2 2" in prompt and prompt.endswith("### Response:\n")
  blocks, mask = instructions.encode_instructions(examples, encode, seq_len=len(prompt) + 4, eos_id=0, pad_id=-1)
  n = len(prompt)
  assert list(blocks[0, n:n + 2]) == [ord("4"), 0] and mask[0, :n].sum() == 0
  assert list(mask[0, n:n + 2]) == [1, 1] and mask[0, n + 2:].sum() == 0
