"""Task evaluation through the lm-evaluation-harness with prunekit's offline tasks."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prunekit.errors import PruneError
from tests.conftest import byte_tokenizer, error_line, invoke, tiny_model

pytest.importorskip("lm_eval")

from prunekit.evaluate import tasks as T  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network: the datasets library may only read local files; the task folder lives in a test cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _docs(name: str) -> list[dict]:
    return [json.loads(x) for x in (T.task_folder() / f"{name}.jsonl").read_text().splitlines()]


def test_task_files_are_deterministic_and_honest(tmp_path):
    a, b = T.task_folder(tmp_path / "one"), T.task_folder(tmp_path / "two")
    for name in T.LOCAL_TASKS:
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        assert len((a / f"{name}.jsonl").read_text().splitlines()) >= 90
    kick = [json.loads(x) for x in (a / "kick-closed.jsonl").read_text().splitlines()]
    for d in kick:
        # open-book: the passage holds the sentence, so the answer follows the prefix in it; closed-book: the
        # prompt (title + prefix) does not give it away
        assert f"{d['prefix']} {d['answer']}" in d["passage"] or f"{d['prefix']}{d['answer']}" in d["passage"]
        assert d["answer"].lower() not in (d["title"] + " " + d["prefix"]).lower().split()
    from prunekit.context.qa import _pydoc_sections

    train_sents = {s for _, sents in _pydoc_sections("train") for s in sents}
    assert not any(d["passage"].startswith(s) for d in kick[:20] for s in train_sents)  # never the calibration topics
    for d in (json.loads(x) for x in (a / "factoid.jsonl").read_text().splitlines()):
        assert d["answer"].lower() not in d["doc"].lower()
    for d in (json.loads(x) for x in (a / "shakespeare-cloze.jsonl").read_text().splitlines()):
        assert len(d["choices"]) == 4 and 0 <= d["gold"] < 4 and len(set(d["choices"])) == 4


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_multiple_choice_score_equals_a_hand_computation():
    model, tok = tiny_model("llama", seed=3), byte_tokenizer()
    res = T.run_tasks(model, tok, "shakespeare-cloze", limit=6, batch_size=4)
    again = T.run_tasks(model, tok, ["shakespeare-cloze"], limit=6, batch_size=2)
    s = res["shakespeare-cloze"]
    assert s["metric"] == "acc" and s["n"] == 6 and "acc_norm" in s["scores"] and s["stderr"] is not None
    assert again["shakespeare-cloze"]["value"] == s["value"]  # deterministic, whatever the batching
    right = 0
    for d in _docs("shakespeare-cloze")[:6]:
        ctx = f"{d['play']}\n{d['speaker']}:\n{d['before']}\n"
        scores = [_loglik(model, tok, ctx, c) for c in d["choices"]]
        right += int(max(range(4), key=scores.__getitem__) == d["gold"])
    assert s["value"] == pytest.approx(right / 6)


def test_exact_match_counts_the_documents_whose_answer_is_generated():
    """A tiny model whose forward is replaced by an oracle that spells the gold name for documents 0 and 2 only (one
    byte per step, greedy) and a wrong word for the others: factoid's exact match must be exactly 2/4."""
    model, tok = tiny_model("llama", seed=4), byte_tokenizer()
    docs = _docs("factoid")[:4]
    assert all(len(d["answer"]) <= 6 for d in docs[::2])  # " name\n" fits the task's 8 generated tokens
    inner, seen = model.forward, {"text": ""}

    def oracle(input_ids=None, **kw):  # batch size 1; with the cache a step passes only the new token
        out = inner(input_ids=input_ids, **kw)
        text = tok.decode(input_ids[0].tolist())
        seen["text"] = text if input_ids.shape[1] > 1 else seen["text"] + text
        logits = torch.zeros_like(out.logits)
        for k, d in enumerate(docs):
            if f"{d['doc']}\nName:" in seen["text"]:
                want = " " + (d["answer"] if k % 2 == 0 else "zzqx") + "\n"
                said = seen["text"][seen["text"].rindex("Name:") + len("Name:"):]
                nxt = want[len(said)] if want.startswith(said) and len(said) < len(want) else "\n"
                logits[0, -1, tok(nxt)["input_ids"][0]] = 50.0
        out.logits = logits
        return out

    model.forward = oracle
    res = T.run_tasks(model, tok, "factoid", limit=4, batch_size=1)["factoid"]
    assert res["metric"] == "exact_match" and res["n"] == 4
    assert res["value"] == pytest.approx(0.5)


def test_a_model_that_knows_the_answers_scores_one():
    """The scoring path is alive: a 'model' whose next token is always the gold continuation's scores 1.0."""
    docs = _docs("shakespeare-cloze")[:5]
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=0)
    gold_ctx = {}
    for d in docs:
        ctx = f"{d['play']}\n{d['speaker']}:\n{d['before']}\n"
        gold_ctx[tuple(tok(ctx)["input_ids"])] = tok(ctx + d["choices"][d["gold"]])["input_ids"]

    class Oracle(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config
            self.device = torch.device("cpu")

        def forward(self, input_ids, attention_mask=None, **kw):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            logits = torch.zeros_like(out.logits)
            for b, row in enumerate(input_ids.tolist()):
                for key, whole in gold_ctx.items():
                    n = len(key)
                    if row[:n] == list(key):
                        for i in range(n - 1, min(len(whole), len(row)) - 1):
                            logits[b, i, whole[i + 1]] = 50.0
            out.logits = logits
            return out

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    res = T.run_tasks(Oracle(model), tok, "shakespeare-cloze", limit=5, batch_size=1)
    assert res["shakespeare-cloze"]["value"] == 1.0


def test_unknown_task_and_bad_limits_are_one_sentence(tiny_dir):
    with pytest.raises(PruneError, match="Unknown task 'nope'"):
        T.task_manager(["nope"])
    d, _ = tiny_dir
    for args, needle in [(["--tasks", "kick-closed,nope"], "Unknown task 'nope'"),
                         (["--tasks", "kick-closed", "--limit", "0"], "--limit must be positive"),
                         (["--limit", "5"], "apply to --tasks"),
                         (["--tasks", " , "], "--tasks is empty")]:
        rc, _, err = invoke("eval", d, "--windows", "1", "--seqlen", "16", *args)
        assert rc == 2 and needle in error_line(err), (args, err)


def test_eval_tasks_join_the_runs_manifest(tiny_dir, tmp_path):
    d, text = tiny_dir
    run = tmp_path / "run"
    rc, _, err = invoke("prune", d, "--method", "magnitude", "--sparsity", "0.5", "--calib", text, "--calib-samples",
                        "2", "--seqlen", "16", "--eval-windows", "2", "--generations", "0", "--out", run)
    assert rc == 0, err
    before = json.loads((run / "prunekit.json").read_text())
    rc, out, err = invoke("eval", run, "--text", text, "--windows", "2", "--seqlen", "16", "--tasks",
                          "shakespeare-cloze,factoid", "--limit", "3", "--json")
    assert rc == 0, err
    res = json.loads(out)
    after = json.loads((run / "prunekit.json").read_text())
    assert set(after["metrics"]["tasks"]) == {"shakespeare-cloze", "factoid"}
    assert after["metrics"]["tasks"] == res["tasks"]
    assert after["metrics"]["tasks"]["factoid"]["metric"] == "exact_match"
    assert after["metrics"]["tasks"]["shakespeare-cloze"]["n"] == 3
    assert after["metrics"]["tasks_settings"]["factoid"] == {"limit": 3, "fewshot": None}
    # everything else the run recorded is kept
    assert after["recipe"] == before["recipe"] and after["layers"] == before["layers"]
    assert after["metrics"]["perplexity"] == before["metrics"]["perplexity"]
    # a second task is merged in, not replacing the first ones
    rc, _, err = invoke("eval", run, "--text", text, "--windows", "1", "--seqlen", "16", "--tasks", "kick-open",
                        "--limit", "2")
    assert rc == 0, err
    assert set(json.loads((run / "prunekit.json").read_text())["metrics"]["tasks"]) == {
        "shakespeare-cloze", "factoid", "kick-open"}
