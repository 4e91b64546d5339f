"""What the CPU here can do: its model and the instruction-set flags the kernels and the benchmarks depend on.

Figures measured on one CPU do not carry to another (AMX, AVX512-BF16 and VNNI change the matmul and the INT4
kernel's speed several-fold), so every benchmark line records `cpu()`, and compiled kernels key their cache on it.
`trim_heap` gives freed memory back to the OS (after compiling a step); `huge_page_environment` asks glibc to
back its large blocks with transparent huge pages, and `restart_with_huge_pages` re-starts a process with it
(the command line does).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu() -> dict:
  """{"model", "cores", "flags"}: the CPU's model name, its logical cores, and which of FLAGS it has."""
  info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
  field = lambda name: next((ln.split(":", 1)[1].strip() for ln in info.splitlines()  # noqa: E731
                             if ln.startswith(name)), "")
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


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_page_environment(environ: dict[str, str]) -> dict[str, str] | None:
  """`environ` with glibc's malloc told to back the blocks it maps (those over 32 MB, or any a thread's arena
  cannot hold) with transparent huge pages, or None where that is set already, would change nothing (not Linux,
  glibc older than 2.35, THP "never") or is declined (QALORA_HUGE_PAGES=0).

  XLA's CPU runtime allocates each execution's temporary buffer (840 MB for a SmolLM2 training step at 4 x 128)
  with malloc on a worker thread, and glibc maps it afresh at every step: the kernel then zeroes and maps it 4 KB
  at a time, about 200,000 page faults a step. In 2 MB pages that is 512 times fewer. glibc reads the setting
  (GLIBC_TUNABLES) only when a process starts."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
  libc, version = platform.libc_ver()
  if (environ.get("QALORA_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables or libc != "glibc"
      or tuple(int(v) for v in version.split(".")[:2]) < (2, 35) or not thp.exists()
      or "[never]" in thp.read_text()):
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def restart_with_huge_pages() -> None:
  """Re-starts this process (same interpreter and arguments) with `huge_page_environment`, where that changes
  anything; returns where it does not, so a process calls it first and goes on after it."""
  environ = huge_page_environment(dict(os.environ))
  if environ is not None:
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def describe() -> str:
  """One line: 'AMD EPYC (2 cores; avx2 avx512f ... )'."""
  c = cpu()
  return f"{c['model']} ({c['cores']} cores; {' '.join(c['flags']) or 'none of ' + ', '.join(FLAGS)})"
