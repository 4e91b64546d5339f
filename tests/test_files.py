"""Atomic writes (qalora_jax.files): the target appears whole or not at all, with the mode a plain open() or
mkdir() gives under the umask (tempfile's own files are private)."""

import os
import stat

import pytest

from qalora_jax import files


@pytest.fixture
def umask():
  old = os.umask(0o027)
  os.umask(old)
  return old


def mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_directories_get_the_umask_mode(tmp_path, umask):
  files.write_json(tmp_path / "a" / "result.json", {"ppl": 1.5})
  assert (tmp_path / "a" / "result.json").read_text() == '{\n  "ppl": 1.5\n}\n'
  assert mode(tmp_path / "a" / "result.json") == 0o666 & ~umask
  with files.atomic_dir(tmp_path / "out") as tmp:
    (tmp / "x").write_text("x")
  assert mode(tmp_path / "out") == 0o777 & ~umask and (tmp_path / "out" / "x").read_text() == "x"
  (tmp_path / "plain").mkdir()
  assert mode(tmp_path / "plain") == mode(tmp_path / "out")


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
  files.write_bytes(tmp_path / "f", b"old")
  with pytest.raises(RuntimeError):
    with files.atomic_dir(tmp_path / "f2"):
      raise RuntimeError("fails half way")
  with pytest.raises(FileExistsError):
    with files.atomic_dir(tmp_path / "f"):
      pass
  with pytest.raises(TypeError):
    files.write_bytes(tmp_path / "f", "not bytes")
  assert sorted(os.listdir(tmp_path)) == ["f"] and (tmp_path / "f").read_bytes() == b"old"
