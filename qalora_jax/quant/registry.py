"""The quantizer protocol and the registry: the public extension API.

A quantizer is a frozen dataclass whose fields are its options, registered under a name:

    @register("myquant")
    @dataclasses.dataclass(frozen=True)
    class MyQuant(Quantizer):
      bits: int = 4
      def _quantize(self, w): ...            # float32 [in, out] -> QTensor (validated input)
      @staticmethod
      def dequantize(qt, dtype): ...         # QTensor -> [in, out] array
      def error_bound(self, w, qt): ...      # element-wise bound on |w - dequantize(qt)|

Every format stores its codes as a 2-D array named `codes` (its leading axes count stacked layers).
`get("myquant", bits=3)` builds one, `available()` lists the names. The contract tests
(tests/test_quant_contract.py) run every registered quantizer under each option set in its
`contract_settings`, so a new quantizer is tested as soon as it is registered.

Discovery: importing `qalora_jax.quant` imports every module of the package (`discover_package`), so a
quantizer is added by dropping its module into qalora_jax/quant/. Quantizers defined outside the package
are imported by module name or .py path with `import_modules` (a run's `config.imports`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any, ClassVar, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax.quant.groups import check_group_size
from qalora_jax.quant.qtensor import QTensor

_REGISTRY: dict[str, type[Quantizer]] = {}
_FILE_MODULES: dict[str, str] = {}  # module name -> the .py file `import_modules` loaded it from


class Quantizer:
  """Base class: validates the weight, then calls the subclass's `_quantize`."""

  name: ClassVar[str]
  # Option sets the shared contract tests run this quantizer with (each is passed to `get`).
  contract_settings: ClassVar[tuple[dict[str, Any], ...]] = ({},)
  # True when this format's dequantize ADDS a float `offset` [ceil(in / g), out] to every weight of group l
  # (w~ = f(codes, ...) + offset[l]) over contiguous groups of `group_size` inputs. QA-LoRA relies on it:
  # its adapter is pooled over those groups and merges by adding to `offset`.
  group_offset: ClassVar[bool] = False
  # True when this quantizer takes calibration data: it then defines quantize_with_hessian(w, H) with
  # H = (2 / N) sum x x^T over the layer's N calibration inputs (GPTQ), and quantize(w) is its data-free fallback.
  needs_calibration: ClassVar[bool] = False

  def quantize(self, w) -> QTensor:
    """Quantizes a float [in, out] weight."""
    w = check_weight(w)
    self.check_shape(w.shape)
    return self._quantize(jnp.asarray(w, jnp.float32))

  def check_shape(self, shape: tuple[int, int]) -> None:
    """Raises ValueError if this quantizer cannot take a weight of this [in, out] shape. By default a
    `group_size` option must fit the input dimension (quant.groups.check_group_size)."""
    if hasattr(self, "group_size"):
      check_group_size(self.group_size, shape[0])

  def _quantize(self, w: jax.Array) -> QTensor:
    raise NotImplementedError

  @staticmethod
  def dequantize(qt: QTensor, dtype=jnp.float32) -> jax.Array:
    raise NotImplementedError

  def error_bound(self, w, qt: QTensor) -> jax.Array:
    """Element-wise upper bound on |w - qt.dequantize()| that this quantizer guarantees."""
    raise NotImplementedError

  def options(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def quantize_stacked(quantizer: Quantizer, w) -> QTensor:
  """Quantizes a kernel [in, out], or stacked kernels [..., in, out] one matrix at a time into one QTensor
  whose leaves carry the leading axes (its metadata describes one matrix)."""
  if w.ndim == 2:
    return quantizer.quantize(w)
  flat = w.reshape((-1,) + tuple(w.shape[-2:]))
  parts = [quantizer.quantize(m) for m in flat]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
  return jax.tree.map(lambda x: x.reshape(tuple(w.shape[:-2]) + x.shape[1:]), stacked)


def has_group_offset(qt: QTensor) -> bool:
  """Whether QA-LoRA can pool over `qt`'s groups and merge into its offsets (see Quantizer.group_offset)."""
  return quantizer_class(qt.format).group_offset and "offset" in qt.arrays


def register(name: str):
  """Class decorator: registers a Quantizer subclass under `name`."""

  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"quantizer name {name!r} is already registered by {defined_by(_REGISTRY[name])}; "
                       f"choose another name for {defined_by(cls)}")
    if not (isinstance(cls, type) and issubclass(cls, Quantizer) and dataclasses.is_dataclass(cls)):
      raise TypeError(f"register({name!r}) expects a dataclass subclass of Quantizer, got {cls!r}")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def defined_by(cls) -> str:
  """Where a class is defined: "module.Class", plus the file for a module `import_modules` loaded from a path."""
  where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
  path = _FILE_MODULES.get(getattr(cls, "__module__", None))
  return f"{where} (from {path})" if path else where


def discover_package() -> list[str]:
  """Imports every module of the qalora_jax.quant package (each quantizer module registers itself on
  import); returns the module names. Idempotent: modules already imported are not run again."""
  package = sys.modules[__name__.rpartition(".")[0]]
  names = [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
  for name in names:
    importlib.import_module(name)
  return names


def import_modules(specs: Iterable[str], where: str = "imports") -> None:
  """Imports quantizer modules from outside the package: each spec is a module name ("mypkg.myquant") or
  the path of a .py file (relative to the working directory). A file is loaded once per resolved path, so
  importing again is a no-op. Raises ValueError naming `where` and the spec."""
  for spec in specs:
    if not isinstance(spec, str) or not spec:
      raise ValueError(f"{where}: {spec!r} is not supported; allowed: a module name or the path of a .py file")
    try:
      if spec.endswith(".py") or "/" in spec or "\\" in spec:
        _import_file(Path(spec))
      else:
        importlib.import_module(spec)
    except ImportError as e:
      _forget_unloaded()
      raise ValueError(f"{where}: cannot import {spec!r}: {e}") from None
    except (ValueError, TypeError) as e:
      _forget_unloaded()
      raise ValueError(f"{where}: importing {spec!r} failed: {e}") from None


def _forget_unloaded() -> None:
  """Unregisters the quantizers of modules that failed half-way through their import (Python has dropped
  them from sys.modules), so importing them again reports the same error, not a duplicate name."""
  for key in [k for k, cls in _REGISTRY.items() if cls.__module__ not in sys.modules]:
    del _REGISTRY[key]


def _import_file(path: Path) -> None:
  if not path.is_file():
    raise ImportError(f"no such file {str(path)!r}")
  resolved = str(path.resolve())
  stem = re.sub(r"\W", "_", path.stem)
  name = f"qalora_imported_{stem}_{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
  if name in sys.modules:
    return
  module_spec = importlib.util.spec_from_file_location(name, resolved)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[name] = module  # dataclasses look their module up while the class body is built
  _FILE_MODULES[name] = str(path)
  try:
    module_spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise


def available() -> list[str]:
  """Names of the registered quantizers, sorted."""
  return sorted(_REGISTRY)


def quantizer_class(name: str) -> type[Quantizer]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown quantizer {name!r}; available: {', '.join(available())}")
  return _REGISTRY[name]


def get(name: str, **options) -> Quantizer:
  """Builds the quantizer registered as `name` with the given options, e.g. get("int", bits=4, group_size=128)."""
  cls = quantizer_class(name)
  allowed = [f.name for f in dataclasses.fields(cls)]
  for key in options:
    if key not in allowed:
      near = difflib.get_close_matches(key, allowed, n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise ValueError(f"unknown option {key!r} for quantizer {name!r}{hint}; allowed: {', '.join(allowed)}")
  return cls(**options)


def check_weight(w) -> np.ndarray | jax.Array:
  """Checks that `w` is a finite, 2-D, floating-point [in, out] array; returns it unchanged."""
  shape = getattr(w, "shape", None)
  dtype = getattr(w, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"weight must be an array, got {type(w).__name__}")
  if len(shape) != 2:
    raise ValueError(f"weight must be 2-D [in, out], got shape {tuple(shape)}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"weight dtype must be floating (float16, bfloat16, float32, float64), got {dtype}")
  if not isinstance(w, jax.core.Tracer) and not bool(jnp.isfinite(w).all()):
    raise ValueError("weight contains NaN or Inf; quantizers accept finite weights only")
  return w
