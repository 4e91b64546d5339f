"""Corpora, instruction data, packing, and deterministic batch iterators."""

from qalora_jax.data.batches import batch_at, pack_blocks
from qalora_jax.data.instructions import read_instructions
from qalora_jax.data.shakespeare import HELDOUT_PLAYS, load_plays, split_plays

__all__ = ["HELDOUT_PLAYS", "batch_at", "load_plays", "pack_blocks", "read_instructions", "split_plays"]
