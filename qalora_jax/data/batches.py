"""Packing token streams into fixed-length blocks, and batches that are a pure function of (seed, step).

Blocks: the documents' tokens joined with an end-of-sequence token between them and cut into
non-overlapping blocks of seq_len + 1 tokens (inputs = block[:-1], targets = block[1:]); the tail that does
not fill a block is dropped.

Batches: epoch e = step * batch // n_blocks visits the blocks in the order of a permutation drawn from
(seed, e); batch `step` takes the next `batch` positions. The same (seed, step) always gives the same batch,
which is what makes an exactly resumable run.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pack_blocks(documents: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
  """[n_blocks, seq_len + 1] int32 blocks of the documents' tokens, EOS between documents."""
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be positive")
  stream = [t for doc in documents for t in (*doc, eos_id)]
  n_blocks = len(stream) // (seq_len + 1)
  if n_blocks == 0:
    raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {seq_len + 1}")
  return np.asarray(stream[: n_blocks * (seq_len + 1)], np.int32).reshape(n_blocks, seq_len + 1)


def batch_indices(n_blocks: int, batch: int, seed: int, step: int) -> np.ndarray:
  """Block indices of batch `step`: positions step*batch .. of the per-epoch permutations."""
  positions = np.arange(step * batch, (step + 1) * batch)
  epochs = positions // n_blocks
  out = np.empty(batch, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(n_blocks)
    sel = epochs == epoch
    out[sel] = perm[positions[sel] % n_blocks]
  return out


def batch_at(blocks: np.ndarray, batch: int, seed: int, step: int, mask: np.ndarray | None = None) -> dict:
  """{"inputs", "targets"[, "mask"]} [batch, seq_len] for training step `step`."""
  index = batch_indices(len(blocks), batch, seed, step)
  out = {"inputs": blocks[index, :-1], "targets": blocks[index, 1:]}
  if mask is not None:
    out["mask"] = mask[index, 1:]
  return out
