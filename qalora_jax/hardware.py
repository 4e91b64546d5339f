"""What the CPU here can do: its model and the instruction-set flags the kernels and the benchmarks depend on.

Figures measured on one CPU do not carry to another (AMX, AVX512-BF16 and VNNI change the matmul and the INT4
kernel's speed several-fold), so every benchmark line records `cpu()`, and compiled kernels key their cache on it.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu() -> dict:
  """{"model", "cores", "flags"}: the CPU's model name, its logical cores, and which of FLAGS it has."""
  info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
  field = lambda name: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(name)), "")  # noqa: E731
  flags = set(field("flags").split())
  return {"model": field("model name") or platform.machine(), "cores": os.cpu_count(),
          "flags": [f for f in FLAGS if f in flags]}


def describe() -> str:
  """One line: 'AMD EPYC (2 cores; avx2 avx512f ... )'."""
  c = cpu()
  return f"{c['model']} ({c['cores']} cores; {' '.join(c['flags']) or 'none of ' + ', '.join(FLAGS)})"
