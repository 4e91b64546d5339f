"""The CPU description the benchmarks record and the compiled kernels key their cache on."""

from pathlib import Path

import pytest

from qalora_jax import hardware
from qalora_jax.kernels import cpu_library


def test_cpu_flags_are_the_ones_proc_cpuinfo_lists():
  info = Path("/proc/cpuinfo")
  if not info.exists():
    pytest.skip("no /proc/cpuinfo")
  listed = set(next(ln for ln in info.read_text().splitlines() if ln.startswith("flags")).split(":", 1)[1].split())
  c = hardware.cpu()
  assert c["flags"] == [f for f in hardware.FLAGS if f in listed]
  assert c["model"] in info.read_text() and c["cores"] >= 1
  assert " ".join(c["flags"]) in hardware.describe()


def test_the_kernel_cache_differs_between_cpus(monkeypatch):
  if not cpu_library.shutil.which("g++"):
    pytest.skip("no C++ compiler")
  here = cpu_library._build()[1]
  monkeypatch.setattr(hardware, "cpu", lambda: {"model": "Another CPU", "cores": 2, "flags": ["avx2"]})
  assert cpu_library._build()[1] != here
  assert cpu_library._build()[1].parent == here.parent


def test_trim_heap_gives_freed_heap_pages_back():
  """After trim_heap, 100 MB of small blocks freed below a block still in use are no longer resident (glibc
  keeps such pages mapped until it is asked)."""
  import ctypes

  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim
  except (OSError, AttributeError):
    pytest.skip("not glibc")
  resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096  # noqa: E731
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  start = resident()
  blocks = [libc.malloc(4096) for _ in range(25_000)]
  for b in blocks:
    ctypes.memset(b, 1, 4096)
  sentinel = libc.malloc(64)  # above them: the heap's top cannot shrink past it
  for b in blocks:
    libc.free(b)
  hardware.trim_heap()
  assert resident() - start < 20e6
  libc.free(sentinel)
