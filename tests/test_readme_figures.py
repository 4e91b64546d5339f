"""README figures come from committed results: generated blocks hold their files, those files are what their
results give, and every figure quoted in prose is what its result gives (experiments/readme_figures.py)."""

import json
import sys
from pathlib import Path

import pytest

from qalora_jax import readme

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import readme_figures  # noqa: E402


def test_every_readme_figure_is_its_committed_result():
  problems = readme_figures.problems()
  assert not problems, "\n".join(problems + ["python experiments/readme_figures.py refills the generated blocks"])


def test_the_documents_have_their_generated_blocks():
  sources = {b.source for doc in readme_figures.DOCS for b in readme.blocks((ROOT / doc).read_text(), doc)}
  assert {"experiments/perf/perf_vs_peers.md", "tables.md"} <= sources


DOC = """# Results

Before.

<!-- generated from results/table.md by make-table -->
| a | b |
|---|---|
| 1 | 2 |
<!-- end -->

The run took 12.5 s and
used 3,000 bytes.
"""


@pytest.fixture
def doc(tmp_path):
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
  (tmp_path / "results" / "run.json").write_text('{"wall_s": 12.5, "bytes": 3000}')
  (tmp_path / "README.md").write_text(DOC)
  return tmp_path


def test_a_block_that_differs_from_its_file_is_named_with_its_line(doc):
  assert readme.check_blocks(doc / "README.md", "README.md") == []
  (doc / "results" / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 3 |\n")
  assert readme.check_blocks(doc / "README.md", "README.md") == [
      "README.md:8: the block generated from results/table.md differs from it at its line 3: the document has "
      "'| 1 | 2 |', the file '| 1 | 3 |' (the file is written by make-table)"]


def test_fill_rewrites_only_the_blocks_and_only_under_the_given_directory(doc):
  (doc / "results" / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 3 |\n| 4 | 5 |\n")
  assert readme.fill(doc / "README.md", under=doc / "results") == 1
  assert (doc / "README.md").read_text() == DOC.replace("| 1 | 2 |\n", "| 1 | 3 |\n| 4 | 5 |\n")
  assert readme.check_blocks(doc / "README.md") == []
  with pytest.raises(ValueError, match="no block '<!-- generated from PATH by COMMAND -->' names a file under"):
    readme.fill(doc / "README.md", under=doc / "elsewhere")


def test_a_block_without_its_end_line_is_refused(doc):
  (doc / "README.md").write_text(DOC.replace("<!-- end -->\n", ""))
  with pytest.raises(ValueError, match=r"README.md:5: the block generated from results/table.md has no "
                                       r"'<!-- end -->' line before the end of the document"):
    readme.check_blocks(doc / "README.md", "README.md")


def test_a_quoted_figure_is_found_across_line_breaks_and_checked_against_its_result(doc):
  def figure(fmt):
    return readme.Figure("README.md", "The run took {} s and used {} bytes.", "results/run.json",
                         lambda r: (format(r["wall_s"], fmt), f"{r['bytes']:,}"))
  assert readme.check_figures([figure(".1f")], doc) == []
  assert readme.check_figures([figure(".2f")], doc) == [
      "README.md:11: 12.5 should read 12.50 in 'The run took {} s and used {} bytes.' (results/run.json)"]


def test_a_figure_whose_words_are_gone_or_repeated_or_whose_source_lacks_it_is_reported(doc):
  gone = readme.Figure("README.md", "The run lasted {} s", "results/run.json", lambda r: (str(r["wall_s"]),))
  missing = readme.Figure("README.md", "The run took {} s", "results/run.json", lambda r: (str(r["seconds"]),))
  (problem_gone,), (problem_missing,) = (readme.check_figures([f], doc) for f in (gone, missing))
  assert "'The run lasted {} s' are found nowhere" in problem_gone
  assert problem_missing == "README.md: 'The run took {} s': results/run.json does not give it (KeyError: 'seconds')"
  (doc / "README.md").write_text(DOC + "\nThe run took 12.5 s again.\n")
  twice = readme.Figure("README.md", "The run took {} s", "results/run.json", lambda r: (str(r["wall_s"]),))
  assert "are found 2 times" in readme.check_figures([twice], doc)[0]


def test_qalora_table_readme_refills_the_blocks_naming_the_sweeps_tables(tmp_path):
  from qalora_jax import cli

  cfg = {"adapter": {"method": "qalora", "rank": 16}, "data": {"batch_size": 4, "seq_len": 128},
         "base": {"quantizer": "int", "options": {"bits": 4, "group_size": 32}}, "model": {"dtype": "float32"}}
  sweep = tmp_path / "sweep"
  (sweep / "cells" / "a").mkdir(parents=True)
  (sweep / "cells" / "a" / "result.json").write_text(json.dumps({"config": cfg, "merged_ppl": 27.5}))
  (sweep / "sweep.json").write_text(json.dumps({"cells": [{"name": "a", "dirname": "a"}]}))
  doc = sweep / "README.md"
  doc.write_text("# Sweep\n\n<!-- generated from tables.md by qalora table --workdir sweep -->\nold\n<!-- end -->\n")
  args = ["table", "--workdir", str(sweep), "--rows", "name", "--value", "merged_ppl", "--readme", str(doc)]
  assert cli.main(args) == 0
  assert "| a | 27.500 |" in doc.read_text() and "old" not in doc.read_text()
  assert readme.check_blocks(doc) == []
  assert cli.main(args[:-1] + [str(tmp_path / "missing.md")]) != 0
