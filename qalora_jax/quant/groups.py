"""The group-wise layout every group quantizer shares: a weight [in, out] is cut along `in` into
ceil(in / g) groups of g rows, each with its own scale (and offset) per output column.

    wg = group_rows(w, g)          # [ceil(in / g), g, out], a short last group padded
    w = ungroup_rows(wg, in)       # back to [in, out]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_group_option(group_size) -> None:
  """A quantizer's group_size option, before any weight is seen: a positive integer, or -1 (per channel)."""
  if not (group_size == -1 or (isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool)
                               and group_size > 0)):
    raise ValueError(f"group_size={group_size!r} is not supported; allowed: a positive integer or -1")


def check_group_size(group_size: int, fan_in: int, name: str = "group_size") -> int:
  """Validates a group size along the input dimension; returns the effective size (-1 -> fan_in).

  A group size that does not divide `fan_in` leaves a shorter last group (ceil(fan_in / g) groups), as GPTQ
  does: SmolLM2's 576-wide projections at g128 have four groups of 128 and one of 64.
  """
  if group_size == -1:
    return fan_in
  if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or not 0 < group_size <= fan_in:
    raise ValueError(f"{name}={group_size!r} is not supported for input dimension {fan_in}; "
                     f"allowed: an integer in 1..{fan_in}, or -1 (per channel)")
  return int(group_size)


def num_groups(fan_in: int, group_size: int) -> int:
  """ceil(fan_in / group_size)."""
  return -(-fan_in // group_size)


def group_rows(x: jax.Array, group_size: int, mode: str = "edge") -> jax.Array:
  """[in, out] -> [ceil(in / g), g, out]; a short last group is padded (by default repeating its last row,
  which leaves its min and max unchanged; mode="constant" pads zeros)."""
  pad = (-x.shape[0]) % group_size
  if pad:
    x = jnp.pad(x, [(0, pad), (0, 0)], mode=mode)
  return x.reshape(-1, group_size, x.shape[1])


def ungroup_rows(x: jax.Array, n_in: int) -> jax.Array:
  """[ceil(in / g), g, out] -> [in, out] (the padding dropped)."""
  return x.reshape(-1, x.shape[-1])[:n_in]
