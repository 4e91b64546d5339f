"""Assembling the parameter tree from a checkpoint's named tensors, shared by the GGUF and safetensors loaders.

A loader supplies a naming scheme (parameter path -> the checkpoint's tensor name, with "{i}" for the layer)
and readers; `assemble` checks that the checkpoint holds exactly the expected tensors with the expected
shapes, converts each one to this project's layout ([out, in] weights -> [in, out] kernels) and stacks the
per-layer tensors along a leading layer axis.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.models.config import Config
from qalora_jax.models.llama import param_shapes
from qalora_jax.tree_paths import flatten, unflatten

_SHOW = 5  # names listed in an error message


class CheckpointError(ValueError):
  """A checkpoint does not match the configuration it declares (missing, unexpected or misshapen tensors)."""


def is_kernel(path: str) -> bool:
  return path.endswith("/kernel")


def source_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape a tensor has in the checkpoint: a kernel [in, out] is stored as a weight [out, in]."""
  return tuple(reversed(shape)) if is_kernel(path) else tuple(shape)


def _listing(names: list[str]) -> str:
  more = f", ... ({len(names) - _SHOW} more)" if len(names) > _SHOW else ""
  return ", ".join(names[:_SHOW]) + more


def expected_tensors(config: Config, names: Mapping[str, str]) -> dict[str, tuple[str, int | None, tuple]]:
  """{checkpoint tensor name: (parameter path, layer or None, shape in the checkpoint)} for `config`."""
  expected = {}
  for path, shape in flatten(param_shapes(config), is_leaf=lambda s: isinstance(s, tuple)):
    if path.startswith("blocks/"):
      for i in range(config.num_layers):
        expected[names[path].format(i=i)] = (path, i, source_shape(path, shape[1:]))
    else:
      expected[names[path]] = (path, None, source_shape(path, shape))
  return expected


def assemble(config: Config, names: Mapping[str, str], available: Iterable[str],
             shape_of: Callable[[str], tuple[int, ...]], read: Callable[[str], np.ndarray], where: str,
             ignore: Callable[[str], bool] = lambda name: False,
             transform: Callable[[str, str, np.ndarray], np.ndarray] | None = None,
             dtype=jnp.float32, per_tensor: Callable[[str, np.ndarray], object] | None = None) -> dict:
  """The parameter tree of `config` from a checkpoint.

  Args:
    names: parameter path (as in `param_shapes`, without the layer axis) -> checkpoint tensor name; block
      parameters contain "{i}".
    available: the checkpoint's tensor names; shape_of(name): a tensor's shape; read(name): its float array,
      both in the checkpoint's [out, in] layout.
    where: the checkpoint, for error messages.
    ignore: names that may be present without being used (e.g. rotary tables, a tied head's copy).
    transform: (path, name, array) -> array, applied before the [out, in] -> [in, out] transpose.
    per_tensor: (path, float32 array in the final layout) -> the leaf (default: the array in `dtype`); called on
      each matrix as it is read (one layer of a block parameter at a time; the stacked layout stacks the
      results), so a quantizing `per_tensor` never holds more than one float matrix.
  """
  expected = expected_tensors(config, names)
  available = list(available)
  present = set(available)
  missing = [n for n in expected if n not in present]
  unexpected = [n for n in available if n not in expected and not ignore(n)]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_listing(unexpected)}")
  if problems:
    raise CheckpointError(f"{where} does not match its {config.arch} configuration: " + "; ".join(problems))
  mismatched = [f"{n} {list(shape_of(n))} (expected {list(s)})" for n, (_, _, s) in expected.items()
                if tuple(shape_of(n)) != s]
  if mismatched:
    raise CheckpointError(f"{where}: tensors with the wrong shape ({len(mismatched)}): {_listing(mismatched)}")

  per_tensor = per_tensor or (lambda path, w: jnp.asarray(w, dtype))

  def tensor(name, path):
    w = np.asarray(read(name), np.float32)
    if transform is not None:
      w = transform(path, name, w)
    return w.T if is_kernel(path) else w

  by_path: dict[str, list[tuple[str, int | None]]] = {}
  for name, (path, layer, _) in expected.items():
    by_path.setdefault(path, []).append((name, layer))
  leaves = {}
  for path, entries in by_path.items():
    if entries[0][1] is None:
      leaves[path] = per_tensor(path, tensor(entries[0][0], path))
      continue
    done = [None] * config.num_layers
    for name, layer in sorted(entries, key=lambda e: e[1]):
      done[layer] = per_tensor(path, tensor(name, path))
    if config.scan_layers:  # stacked layout: one leaf (arrays or QTensors) with a leading layer axis
      leaves[path] = jax.tree.map(lambda *xs: jnp.stack(xs), *done)
    else:  # per-layer layout: blocks/<i>/...
      for i, leaf in enumerate(done):
        leaves[path.replace("blocks/", f"blocks/{i}/", 1)] = leaf
    del done
  return unflatten(leaves)
