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
