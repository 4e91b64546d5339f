"""Argument checks shared by every layer: a bad value is refused with one line naming it and what is allowed."""

from __future__ import annotations

from typing import Any


def check_choice(name: str, value: Any, allowed) -> None:
  """Raises ValueError naming the parameter and its allowed values when `value` is not among them."""
  if value not in allowed:
    shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
    raise ValueError(f"{name}={value!r} is not supported; allowed: {shown}")
