"""Corpora and their token cache, instruction data, packing, and deterministic batch iterators."""

from qalora_jax.data.batches import batch_at, pack_blocks
from qalora_jax.data.corpus import HELDOUT_PLAYS, corpus_files, load_plays, split_plays, tokenized_plays
from qalora_jax.data.instructions import read_instructions

__all__ = ["HELDOUT_PLAYS", "batch_at", "corpus_files", "load_plays", "pack_blocks", "read_instructions",
           "split_plays", "tokenized_plays"]
