"""Splitting a parameter tree in two by a regex over "/"-joined leaf paths.

    extra, frozen = partition(frozen, r".*norm/scale")   # e.g. train the norms too
    trainable = combine(adapters, extra)

Both halves keep the nested-dict structure and hold only their own leaves, so the optimizer sees the
trainable half alone: frozen leaves never get a gradient buffer or optimizer state.
"""

from __future__ import annotations

import re
from typing import Any, Iterator


def path_leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """("/"-joined path, leaf) pairs of a nested-dict tree (a QTensor or an Adapter is one leaf)."""
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      yield from path_leaves(value, path)
    else:
      yield path, value


def partition(tree: dict, pattern: str | None) -> tuple[dict, dict]:
  """(leaves whose path fully matches `pattern`, the rest); `pattern` None selects nothing."""
  selected: dict = {}
  rest: dict = {}
  for path, leaf in path_leaves(tree):
    target = selected if pattern and re.fullmatch(pattern, path) else rest
    node = target
    keys = path.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return selected, rest

