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


def test_huge_page_environment_adds_glibcs_tunable_once():
  environ = {"PATH": "/bin"}
  if hardware.huge_page_environment(environ) is None:
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  assert hardware.huge_page_environment(environ) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert hardware.huge_page_environment(other)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert hardware.huge_page_environment(hardware.huge_page_environment(other)) is None  # set already: no loop
  assert hardware.huge_page_environment({**environ, "QALORA_HUGE_PAGES": "0"}) is None


RESTARTED = """
import ctypes, os, sys
from qalora_jax import cli
if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""):
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  huge = lambda: int(next(ln for ln in open("/proc/self/smaps_rollup") if ln.startswith("AnonHugePages")).split()[1])
  before = huge()
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  print("huge KB", huge() - before)
  sys.exit(0)
sys.exit(cli.main())
"""


def test_the_command_line_restarts_itself_so_that_large_blocks_lie_in_huge_pages():
  """`qalora` (cli.main with no argv) re-starts its process once with the tunable; there, a 64 MB block from
  malloc, touched, is backed by 2 MB pages. QALORA_HUGE_PAGES=0 keeps the process as it is."""
  import os
  import subprocess
  import sys

  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "QALORA_HUGE_PAGES")}
  if hardware.huge_page_environment(environ) is None or not Path("/proc/self/smaps_rollup").exists():
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  run = lambda env: subprocess.run([sys.executable, "-c", RESTARTED, "--help"], env=env,  # noqa: E731
                                   capture_output=True, text=True, timeout=60)
  restarted = run(environ)
  assert restarted.returncode == 0, restarted.stderr
  assert int(restarted.stdout.split("huge KB")[1]) >= 32 << 10
  kept = run({**environ, "QALORA_HUGE_PAGES": "0"})
  assert kept.returncode == 0 and "huge KB" not in kept.stdout and "usage: qalora" in kept.stdout
