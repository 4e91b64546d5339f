"""What the CPU here can do: its model and the instruction-set flags the kernels and the benchmarks depend on.

Figures measured on one CPU do not carry to another (AMX, AVX512-BF16 and VNNI change the matmul and the INT4
kernel's speed several-fold), so every benchmark line records `cpu()`, and compiled kernels key their cache on it.
`trim_heap` gives freed memory back to the OS (after compiling a step).
"""

from __future__ import annotations

import ctypes
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


def trim_heap() -> None:
  """Hands the C heap's free memory back to the OS (glibc's malloc_trim; nothing where libc has none). XLA's
  compiler frees its working memory when it is done, but glibc keeps the pages, so without this a training
  step's buffers come on top of the compiler's peak in the process's resident memory."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def describe() -> str:
  """One line: 'AMD EPYC (2 cores; avx2 avx512f ... )'."""
  c = cpu()
  return f"{c['model']} ({c['cores']} cores; {' '.join(c['flags']) or 'none of ' + ', '.join(FLAGS)})"
