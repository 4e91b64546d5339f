"""The README's "Your own Flax model" example, run as written (from a temporary working directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
  section = README.read_text().split("### Your own Flax model", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_flax_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(readme_example(), "README.md: Your own Flax model", "exec"), scope)
  losses = scope["losses"]
  assert losses[-1] < 0.5 * losses[0]  # the INT4 MLP learnt through its QA-LoRA adapters
  assert (tmp_path / "runs" / "mlp-adapters" / "step.json").exists()
  assert "AdapterParam" in capsys.readouterr().out  # nnx.display showed the adapted layer
