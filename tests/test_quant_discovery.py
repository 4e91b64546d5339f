"""How quantizers are found: every module of qalora_jax.quant on import, outside modules through
`import_modules` / config.imports; duplicate names and QA-LoRA on offset-less bases fail early."""

import json
import sys
from pathlib import Path

import pytest

from qalora_jax import cli, quant
from qalora_jax.quant import registry
from qalora_jax.train import config as config_lib

QUANTIZER_FILE = '''
import dataclasses
from qalora_jax import quant
from qalora_jax.quant.intk import IntQuantizer


@quant.register("{name}")
@dataclasses.dataclass(frozen=True)
class Renamed(IntQuantizer):
  """`int` under another name."""
{extra}
'''


@pytest.fixture
def clean_registry():
  """Restores the registry (and the modules imported from files) after the test."""
  saved = dict(registry._REGISTRY)
  modules = set(sys.modules)
  yield
  registry._REGISTRY.clear()
  registry._REGISTRY.update(saved)
  for name in set(sys.modules) - modules:
    if name.startswith("qalora_imported_") or name.rpartition(".")[2].startswith("probe_"):
      del sys.modules[name]
  for name in [n for n in vars(quant) if n.startswith("probe_")]:
    delattr(quant, name)


def write(path: Path, name: str, extra: str = "") -> Path:
  path.write_text(QUANTIZER_FILE.format(name=name, extra=extra))
  return path


def test_every_module_of_the_package_is_imported():
  package = Path(quant.__file__).parent
  names = {f"qalora_jax.quant.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
  assert names <= set(sys.modules)
  assert set(quant.discover_package()) == names
  assert {"int", "gptq", "nf4", "fp4"} <= set(quant.available())


def test_a_module_dropped_into_the_package_registers_itself(tmp_path, clean_registry, monkeypatch):
  write(tmp_path / "probe_dropped.py", "probe-dropped")
  monkeypatch.setattr(quant, "__path__", [*quant.__path__, str(tmp_path)])
  quant.discover_package()
  assert "probe-dropped" in quant.available()
  assert quant.get("probe-dropped", bits=3).options()["bits"] == 3


def test_import_modules_by_path_and_by_name(tmp_path, clean_registry, monkeypatch):
  path = write(tmp_path / "outside.py", "probe-file")
  quant.import_modules([str(path)])
  quant.import_modules([str(path)])  # loaded once: no duplicate name
  assert "probe-file" in quant.available()
  write(tmp_path / "probe_named.py", "probe-named")
  monkeypatch.syspath_prepend(str(tmp_path))
  quant.import_modules(["probe_named"])
  assert "probe-named" in quant.available()


def test_duplicate_names_name_the_owner(tmp_path, clean_registry):
  with pytest.raises(ValueError, match=r"quantizer name 'int' is already registered by "
                                       r"qalora_jax\.quant\.intk\.IntQuantizer; choose another name"):
    quant.register("int")(registry.quantizer_class("nf4"))
  path = write(tmp_path / "taken.py", "int")
  with pytest.raises(ValueError, match=r"imports: importing '.*taken.py' failed: quantizer name 'int' is already "
                                       r"registered by qalora_jax\.quant\.intk\.IntQuantizer; choose another name "
                                       r"for .*Renamed \(from .*taken.py\)"):
    quant.import_modules([str(path)])
  first = write(tmp_path / "first.py", "probe-twice")
  second = write(tmp_path / "second.py", "probe-twice")
  quant.import_modules([str(first)])
  with pytest.raises(ValueError, match=r"already registered by qalora_imported_first_\w+\.Renamed \(from .*first.py\)"):
    quant.import_modules([str(second)])


def test_a_module_failing_half_way_leaves_nothing_registered(tmp_path, clean_registry):
  path = write(tmp_path / "broken.py", "probe-broken", extra="\nraise ValueError('broken on purpose')\n")
  for _ in range(2):  # the same error again, not a duplicate name
    with pytest.raises(ValueError, match="broken on purpose"):
      quant.import_modules([str(path)])
  assert "probe-broken" not in quant.available()


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_here", "cannot import 'no_such_module_here': No module named"),
    ("missing/file.py", "cannot import 'missing/file.py': no such file"),
    ("", "'' is not supported; allowed: a module name or the path of a .py file"),
])
def test_bad_imports(spec, message):
  with pytest.raises(ValueError, match=message):
    quant.import_modules([spec])


def test_config_imports_a_quantizer_from_a_file(tmp_path, clean_registry):
  path = write(tmp_path / "cfg_quant.py", "probe-config")
  cfg = config_lib.load("configs/tiny.py", [f"--config.imports={path}", "--config.base.quantizer=probe-config"])
  assert cfg.imports == (str(path),)
  again = config_lib.from_json(json.loads(cfg.to_json_best_effort()))  # what eval / merge read back
  assert again.imports == cfg.imports and again.base.quantizer == "probe-config"
  with pytest.raises(ValueError, match=r"config.imports=\('nope_mod',\): cannot import 'nope_mod'"):
    config_lib.load("configs/tiny.py", ["--config.imports=nope_mod"])


@pytest.mark.parametrize("arg, overrides, quantizer", [
    ("method=qlora", ["--config.adapter.method=qalora"], "'nf4' with options {'block_size': 32, 'double_quant': True}"),
    ("method=qalora", ["--config.base.options.symmetric=true"], "'int' with options {.*'symmetric': True"),
])
def test_qalora_on_a_base_without_offsets_fails_at_configuration(arg, overrides, quantizer):
  with pytest.raises(ValueError, match=r"config.adapter.method='qalora' needs a base whose groups carry an additive "
                                       rf"offset .*config.base.quantizer={quantizer}.* does not; allowed: .*int"):
    config_lib.load(f"configs/tiny.py:{arg}", overrides)


def test_quantize_report_import_errors(capsys):
  assert cli.main(["quantize-report", "--import", "nope_mod", "--quantizer", "int"]) == 2
  assert "--import: cannot import 'nope_mod'" in capsys.readouterr().err


def test_a_run_written_before_config_imports_existed_still_resumes(tmp_path):
  cfg = config_lib.load("configs/tiny.py")
  old = json.loads(cfg.to_json_best_effort())
  del old["imports"]
  assert config_lib.changed_fields(old, cfg) == []  # not "imports"
  other = config_lib.load("configs/tiny.py", ["--config.imports=qalora_jax.quant.intk"])
  assert config_lib.changed_fields(old, other) == ["imports"]
