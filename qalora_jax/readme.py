"""Figures in Markdown documents kept in step with the committed result files they come from.

A figure appears in one of two forms.

A generated block holds a file verbatim (a table written by `qalora table` or by an experiment script),
between a line naming the file and the command that writes it, and an end line:

    <!-- generated from experiments/perf/perf_vs_peers.md by experiments/perf_vs_peers.py --readme -->
    ...the file's text, exactly...
    <!-- end -->

The path is relative to the document's directory. `fill` rewrites the blocks from their files, and
`check_blocks` names each block that differs from its file, with the first differing line.

A figure quoted in prose is a `Figure`: the words around it as the document has them, "{}" where each value
goes, and a function that gives those values, formatted as the document writes them, from the committed
result. `check_figures` finds the words in the document (any run of whitespace matches any other, so lines
may wrap anywhere) and names each figure whose values differ from what its result gives.

Both checks only read files: nothing is run or measured.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qalora_jax.files import write_bytes

BEGIN = re.compile(r"^<!-- generated from (\S+) by (.+?) -->$", re.MULTILINE)
END = re.compile(r"^<!-- end -->$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Block:
  """A generated block of a document: its file as written in the document, the command that writes the file,
  the line of its first marker (1-based) and the character span of its content."""
  source: str
  command: str
  line: int
  start: int
  end: int


def blocks(text: str, where: str = "document") -> list[Block]:
  """The generated blocks of a document's text, in order; a block without its end line is a ValueError."""
  found = []
  for m in BEGIN.finditer(text):
    line = text.count("\n", 0, m.start()) + 1
    end, after = END.search(text, m.end()), BEGIN.search(text, m.end())
    if end is None or (after is not None and after.start() < end.start()):
      raise ValueError(f"{where}:{line}: the block generated from {m.group(1)} has no '<!-- end -->' line "
                       f"before {'the next block' if end else 'the end of the document'}")
    found.append(Block(m.group(1), m.group(2), line, m.end() + 1, end.start()))
  return found


def _source_path(doc: Path, block: Block) -> Path:
  return doc.parent / block.source


def _content(source: Path) -> str:
  """What a block of `source` holds: its text, ending with a line break (the end line stands on its own)."""
  text = source.read_text()
  return text if not text or text.endswith("\n") else text + "\n"


def first_difference(have: str, want: str) -> tuple[int, str, str] | None:
  """(index, that line of `have`, that line of `want`, each quoted or "nothing more") of the first line where
  two texts differ; None when they are equal."""
  if have == want:
    return None
  a, b = have.splitlines(), want.splitlines()
  i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  quote = lambda lines: repr(lines[i]) if i < len(lines) else "nothing more"  # noqa: E731
  return i, quote(a), quote(b)


def fill(doc: str | Path, under: str | Path | None = None) -> int:
  """Rewrites the document's generated blocks from their files (only those whose file lies under `under`,
  when given); returns the number of blocks filled. The document is written atomically, and only when it
  changes."""
  doc = Path(doc)
  original = text = doc.read_text()
  chosen = [b for b in blocks(text, str(doc))
            if under is None or _source_path(doc, b).resolve().is_relative_to(Path(under).resolve())]
  if under is not None and not chosen:
    raise ValueError(f"{doc}: no block '<!-- generated from PATH by COMMAND -->' names a file under {under}; "
                     f"add one where its tables go")
  for block in reversed(chosen):
    source = _source_path(doc, block)
    if not source.is_file():
      raise ValueError(f"{doc}:{block.line}: the block's file {block.source} does not exist (written by "
                       f"{block.command})")
    text = text[:block.start] + _content(source) + text[block.end:]
  if text != original:
    write_bytes(doc, text.encode())
  return len(chosen)


def check_blocks(doc: str | Path, name: str | None = None) -> list[str]:
  """One line for each generated block of the document that differs from its file: the document and line,
  the file, the command that writes it, and the first line that differs. `name` is how the lines call the
  document (default: its path)."""
  doc = Path(doc)
  name = name or str(doc)
  text = doc.read_text()
  problems = []
  for block in blocks(text, name):
    source = _source_path(doc, block)
    if not source.is_file():
      problems.append(f"{name}:{block.line}: the block's file {block.source} does not exist (written by "
                      f"{block.command})")
      continue
    diff = first_difference(text[block.start:block.end], _content(source))
    if diff is None:
      continue
    i, got, expected = diff
    line = text.count("\n", 0, block.start) + 1 + i
    problems.append(f"{name}:{line}: the block generated from {block.source} differs from it at its line "
                    f"{i + 1}: the document has {got}, the file {expected} (the file is written by "
                    f"{block.command})")
  return problems


@dataclasses.dataclass(frozen=True)
class Figure:
  """A figure quoted in a document's prose. `text`: the words around it as the document has them, "{}" for
  each value; `source`: the committed result, relative to the root the check is given; `value`: the values
  as the document writes them (strings), from the loaded source (see `load`)."""
  doc: str
  text: str
  source: str
  value: Callable[[Any], tuple[str, ...]]


class SweepResults(dict):
  """{cell name: result} of a sweep directory; a name without a finished cell is a KeyError that says so."""

  def __missing__(self, name: str):
    raise KeyError(f"no finished cell named {name!r} (is the sweep still running?)")


def load(path: str | Path) -> Any:
  """A committed result: a .json file as its object, a .jsonl file as a list of objects, a sweep directory
  (one with sweep.json) as {cell name: the result.json of the first finished cell of that name}, and any
  other file as its text."""
  path = Path(path)
  if path.is_dir():
    if not (path / "sweep.json").is_file():
      raise ValueError(f"{path}: a directory source must be a sweep directory (with sweep.json)")
    results = SweepResults()
    for cell in json.loads((path / "sweep.json").read_text())["cells"]:
      result = path / "cells" / cell["dirname"] / "result.json"
      if cell["name"] not in results and result.is_file():
        results[cell["name"]] = json.loads(result.read_text())
    return results
  text = path.read_text()
  if path.suffix == ".json":
    return json.loads(text)
  if path.suffix == ".jsonl":
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  return text


def _pattern(text: str) -> re.Pattern:
  """The figure's words as a pattern: whitespace matches any whitespace, each "{}" captures a value."""
  parts = [r"\s+".join(re.escape(word) for word in re.split(r"\s+", part)) for part in text.split("{}")]
  return re.compile(r"(\S+)".join(parts))


def _short(text: str) -> str:
  text = " ".join(text.split())
  return text if len(text) <= 72 else text[:69] + "..."


def check_figures(figures: Iterable[Figure], root: str | Path) -> list[str]:
  """One line for each value of a figure that differs from what its source gives (the document and line, the
  value there and the one expected), and for each figure whose words the document does not hold exactly once
  or whose source does not give it."""
  root = Path(root)
  problems, loaded, docs = [], {}, {}
  for fig in figures:
    doc = docs.setdefault(fig.doc, (root / fig.doc).read_text())
    if not (root / fig.source).exists():
      problems.append(f"{fig.doc}: {_short(fig.text)!r}: its source {fig.source} does not exist")
      continue
    try:
      if fig.source not in loaded:
        loaded[fig.source] = load(root / fig.source)
      values = fig.value(loaded[fig.source])
    except (OSError, KeyError, ValueError, ZeroDivisionError) as e:
      problems.append(f"{fig.doc}: {_short(fig.text)!r}: {fig.source} does not give it ({type(e).__name__}: {e})")
      continue
    matches = list(_pattern(fig.text).finditer(doc))
    if len(matches) != 1:
      where = "nowhere" if not matches else f"{len(matches)} times"
      problems.append(f"{fig.doc}: the words {_short(fig.text)!r} are found {where}; a figure's words must "
                      f"appear exactly once (change them in the document and in the figure together)")
      continue
    for i, (have, want) in enumerate(zip(matches[0].groups(), values, strict=True)):
      if have != want:
        line = doc.count("\n", 0, matches[0].start(i + 1)) + 1
        problems.append(f"{fig.doc}:{line}: {have} should read {want} in {_short(fig.text)!r} ({fig.source})")
  return problems
