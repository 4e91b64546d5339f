"""Code versions, content hashes and cache stamps (qalora_jax.provenance), and the token cache keyed on content."""

import hashlib
import json
import shutil

import pytest

from qalora_jax import data, models, provenance

quiet = lambda message: None  # noqa: E731


def test_code_version_hashes_the_named_sources():
  whole, quant = provenance.code_version(), provenance.code_version("quant")
  assert len(whole) == len(quant) == 12 and whole != quant
  assert provenance.code_version("quant") == quant
  with pytest.raises(ValueError, match="code_version part 'nope'"):
    provenance.code_version("nope")


def test_file_sha256_is_the_content_hash(tmp_path):
  f = tmp_path / "a.txt"
  f.write_bytes(b"to be or not to be")
  assert provenance.file_sha256(f) == hashlib.sha256(b"to be or not to be").hexdigest()
  g = tmp_path / "b" / "a.txt"
  g.parent.mkdir()
  shutil.copy(f, g)
  assert provenance.files_sha256([f], tmp_path) == provenance.files_sha256([g], g.parent)  # the path does not count


def test_stamps(tmp_path):
  entry = tmp_path / "x.npz"
  assert not provenance.is_current(entry, "v1")
  entry.write_bytes(b"data")
  notices = []
  assert not provenance.is_current(entry, "v1", notices.append)  # no stamp: an older layout, rebuilt
  assert not entry.exists() and "unknown" in notices[0]
  entry.write_bytes(b"data")
  provenance.write_stamp(entry, "v1", corpus="c")
  assert provenance.is_current(entry, "v1", notices.append) and len(notices) == 1
  assert json.loads((tmp_path / "x.npz.json").read_text()) == {"code_version": "v1", "inputs": {"corpus": "c"}}
  assert not provenance.is_current(entry, "v2", notices.append) and not entry.exists()
  assert "made by code version v1, this code is v2" in notices[1]


def _corpus(root, tempest="Full fathom five thy father lies."):
  (root / "romances").mkdir(parents=True)
  (root / "romances" / "the-tempest.md").write_text(tempest)
  (root / "comedies").mkdir()
  (root / "comedies" / "as-you-like-it.md").write_text("All the world's a stage.")
  return root


def test_token_cache_keys_on_the_corpus_content(tmp_path, monkeypatch):
  monkeypatch.setenv("QALORA_JAX_CACHE", str(tmp_path / "cache"))
  tokenizer = models.tiny_model().tokenizer
  a, b = _corpus(tmp_path / "a"), _corpus(tmp_path / "b")
  plays_a = data.tokenized_plays(str(a), tokenizer, log=quiet)
  data.tokenized_plays(str(b), tokenizer, log=quiet)
  assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1  # the same content elsewhere: one entry
  assert sorted(plays_a) == ["comedies/as-you-like-it", "romances/the-tempest"]
  assert plays_a["romances/the-tempest"].tolist() == tokenizer.encode("Full fathom five thy father lies.")

  (b / "romances" / "the-tempest.md").write_text("We are such stuff as dreams are made on.")
  plays_b = data.tokenized_plays(str(b), tokenizer, log=quiet)
  assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 2  # edited content: a new entry
  assert plays_b["romances/the-tempest"].tolist() == tokenizer.encode("We are such stuff as dreams are made on.")
  _, held = data.split_plays(plays_b, data.HELDOUT_PLAYS)
  assert list(held) == ["romances/the-tempest"]
