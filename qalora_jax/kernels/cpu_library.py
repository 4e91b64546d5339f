"""The C++ CPU kernels (cpu_matmul.cc, cpu_attention.cc, cpu_gemm.cc) as one library, compiled for this machine and
registered with XLA as FFI targets.

The sources are compiled on first use with the system C++ compiler ($CXX, else g++) for this machine
(-march=native) and cached under the asset cache, keyed on the sources, the compiler and its flags, the JAX and
jaxlib versions and the CPU's model and instruction flags (a cache carried to another CPU is never loaded
there). Where that fails (no compiler, no AVX512-VNNI, a non-CPU backend, QALORA_CPU_KERNELS=0), `available`
is False and callers fall back to plain JAX.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

from qalora_jax import hardware

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_matmul.cc", "cpu_attention.cc", "cpu_gemm.cc"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_threads.h", "cpu_amx.h"))
TARGETS = ("qalora_cpu_matmul_f32", "qalora_cpu_matmul_f16", "qalora_cpu_attention", "qalora_cpu_attention_fwd",
           "qalora_cpu_attention_bwd", "qalora_cpu_gemm")


def _build() -> tuple[list[str], Path]:
  """The compiler command (less the output) and the cached library's path, keyed on everything the library
  depends on. -march=native makes it valid only on a CPU with the same instructions, so they are in the key."""
  from qalora_jax import assets

  cxx = os.environ.get("CXX") or shutil.which("g++")
  if not cxx:
    raise RuntimeError("no C++ compiler (set CXX or install g++)")
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir()]
  machine = hardware.cpu()
  key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(
      [cxx, *flags, jax.__version__, jaxlib.__version__, machine["model"], *machine["flags"]]).encode()).hexdigest()
  return [cxx, *flags, *map(str, SOURCES)], assets.cache_dir() / "kernels" / f"cpu_kernels-{key[:16]}.so"


def _compile() -> Path:
  """The library for this machine, compiled once and cached (raises RuntimeError when it cannot be)."""
  command, path = _build()
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    done = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True)
    if done.returncode:
      errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
      raise RuntimeError(f"compiling the CPU kernels failed: {errors[0] if errors else done.returncode}")
    os.replace(out, path)  # atomic: a half-written library is never loaded
  return path


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded library with its FFI targets registered, or None where the kernels do not run here (not a CPU
  backend, QALORA_CPU_KERNELS="0", or a library that does not compile or load)."""
  if os.environ.get("QALORA_CPU_KERNELS") == "0" or jax.default_backend() != "cpu":
    return None
  try:
    loaded = ctypes.cdll.LoadLibrary(str(_compile()))
  except (RuntimeError, OSError) as e:
    warnings.warn(f"the CPU kernels are unavailable ({e}); int8 matmuls and the decoding attention fall back to "
                  "plain JAX", stacklevel=3)
    return None
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(loaded, name)), platform="cpu")
  return loaded


def available() -> bool:
  """Whether the kernels run here (see `library`)."""
  return library() is not None


def amx() -> bool:
  """Whether the kernels' products may run on AMX tiles here: the CPU has AMX-BF16, Linux lets the process use the
  tile state, and QALORA_CPU_AMX is not "0" (attention's bfloat16 products then use vdpbf16ps, the float32 GEMM
  its AVX512 FMAs)."""
  if os.environ.get("QALORA_CPU_AMX") == "0" or "amx_bf16" not in hardware.cpu()["flags"]:
    return False
  loaded = library()
  return loaded is not None and bool(loaded.qalora_amx_ready())
