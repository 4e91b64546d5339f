"""Nested-dict trees (parameter trees, configs as JSON) addressed by joined paths: how every module walks them.

    leaves = dict(flatten(params))            # {"blocks/attn/q_proj/kernel": QTensor, ...}
    params = unflatten(leaves)                # the nested dicts again
    chosen, rest = partition(params, r".*norm/scale")
    set_path(adapters, "blocks/attn/q_proj/adapter", adapter)
    dict(flatten(config_json, sep="."))       # {"adapter.rank": 16, ...}

A leaf is anything that is not a dict (a QTensor or an Adapter is one leaf), or a dict that `is_leaf` accepts.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator


def flatten(tree: dict, prefix: str = "", is_leaf: Callable[[Any], bool] | None = None,
            sep: str = "/") -> Iterator[tuple[str, Any]]:
  """Yields (path, leaf) over a nested dict, paths joined by `sep`, in the dicts' order."""
  for key, value in tree.items():
    path = f"{prefix}{sep}{key}" if prefix else str(key)
    if isinstance(value, dict) and not (is_leaf and is_leaf(value)):
      yield from flatten(value, path, is_leaf, sep)
    else:
      yield path, value


def set_path(tree: dict, path: str, value: Any, sep: str = "/") -> None:
  """tree[a][b][c] = value for path "a/b/c", creating the dicts on the way (in place)."""
  *parents, last = path.split(sep)
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def unflatten(leaves: dict[str, Any], sep: str = "/") -> dict:
  """The inverse of `flatten`: {"a/b/c": leaf} -> nested dicts."""
  tree: dict = {}
  for path, value in leaves.items():
    set_path(tree, path, value, sep)
  return tree


def partition(tree: dict, pattern: str | None) -> tuple[dict, dict]:
  """(the leaves whose path fully matches `pattern`, the rest), each a nested dict holding only its own
  leaves; `pattern` None selects nothing."""
  chosen, rest = {}, {}
  for path, leaf in flatten(tree):
    set_path(chosen if pattern and re.fullmatch(pattern, path) else rest, path, leaf)
  return chosen, rest
