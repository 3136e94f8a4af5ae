"""Sentence splitting without downloads (no nltk data): rules for English prose and technical text.

A sentence ends at ``.``, ``!``, ``?`` or ``...`` (closing quotes and brackets included) followed by white space
and then something that can start a sentence (a capital, a digit, a quote, a bracket, a bullet), or at a blank
line or a heading's underline (``====``). Common abbreviations (``e.g.``, ``Mr.``, ``etc.`` before a lower-case word),
initials (``J. R.``), decimals (``3.14``) and dotted names (``os.path``) do not end a sentence. Spans cover the
text: joining every sentence gives the passage back exactly.
"""

from __future__ import annotations

import re

_ABBREV = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "cf", "fig", "no", "vol",
    "approx", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
    "dec", "mt", "gen", "col", "capt", "lt", "rev", "p", "pp", "al",
}
# an end mark, optional closing quotes/brackets, then white space
_END = re.compile(r"(\.\.\.|[.!?])[\"'\u2019\u201d)\]]*(?=\s)")
_BLANK = re.compile(r"\n[ \t]*\n\s*|\n[=*\-~^]{3,}[ \t]*\n\s*")  # a blank line; a heading's underline
_STARTS = re.compile(r"\s+[\"'\u2018\u201c(\[A-Z0-9*\-\u2022]")


def _ends_here(text: str, m: re.Match) -> bool:
    if not _STARTS.match(text, m.end()):
        return False
    if m.group(1) != ".":
        return True
    word = re.search(r"([\w.]+)\.$", text[max(0, m.start() - 20):m.start() + 1])
    w = word.group(1).lower() if word else ""
    if w in _ABBREV:
        return False
    if len(w) == 1 and w.isalpha() and text[m.start() - 1].isupper():  # an initial: "J. R. Smith"
        return False
    return True


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence; each span takes the white space after it, so the spans tile ``text``."""
    cuts = set()
    for m in _END.finditer(text):
        if _ends_here(text, m):
            ws = re.match(r"\s*", text[m.end():])
            cuts.add(m.end() + ws.end())
    for m in _BLANK.finditer(text):
        cuts.add(m.end())
    cuts = sorted(c for c in cuts if 0 < c < len(text))
    bounds = [0, *cuts, len(text)]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    # white space alone is not a sentence: give it to the sentence before
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and not text[a:b].strip():
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` with their trailing white space (``"".join(...) == text``)."""
    return [text[a:b] for a, b in sentence_spans(text)]
