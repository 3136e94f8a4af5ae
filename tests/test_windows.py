"""Calibration and evaluation windows follow the tokenizer's begin-of-sequence convention."""

import json

import pytest
import torch

import prunekit
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, resolve_bos, tokenize
from prunekit.errors import PruneError
from prunekit.evaluate import prompts_from
from tests.conftest import bos_tokenizer, byte_tokenizer, tiny_model
from tests.test_cli import run

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def test_bos_adding_tokenizer_windows_start_with_bos():
    tok = bos_tokenizer()
    bos = bos_id(tok)
    assert bos == 0
    ids = tokenize(tok, TEXT)
    assert ids[0] != bos  # the stream itself has no special tokens
    cal = calibration_batches(ids, 6, 16, seed=3, bos=bos)
    ev = evaluation_windows(ids, 16, bos=bos)
    for w in (cal, ev):
        assert w.shape[1] == 16 and bool((w[:, 0] == bos).all())
        assert not bool((w[:, 1:] == bos).any())
    # evaluation: every text token exactly once, in order, after the BOS of its window
    assert torch.equal(ev[:, 1:].reshape(-1), ids[: ev.shape[0] * 15])
    # calibration: each window's text is a contiguous piece of the stream
    for w in cal:
        body = w[1:]
        starts = [s for s in range(ids.numel() - 14) if torch.equal(ids[s : s + 15], body)]
        assert starts
    # generation prompts (and so agreement windows) start with BOS too
    assert all(int(p[0]) == bos for p in prompts_from(ev, 3))


def test_tokenizer_without_bos_gives_plain_windows():
    tok = byte_tokenizer()
    assert bos_id(tok) is None
    ids = tokenize(tok, TEXT)
    ev = evaluation_windows(ids, 16, bos=bos_id(tok))
    assert torch.equal(ev.reshape(-1), ids[: ev.numel()])


def test_resolve_bos_can_force_or_drop():
    assert resolve_bos(bos_tokenizer(), None) == 0 and resolve_bos(bos_tokenizer(), False) is None
    assert resolve_bos(byte_tokenizer(), None) is None
    with pytest.raises(PruneError, match="no begin-of-sequence"):
        resolve_bos(byte_tokenizer(), True)
    with pytest.raises(PruneError, match="no room"):
        calibration_batches(torch.arange(10), 2, 1, bos=0)
    with pytest.raises(PruneError, match="at least 2 tokens"):
        evaluation_windows(torch.arange(10), 1)


def test_recipe_records_bos_and_rejects_a_mismatch():
    ids = tokenize(bos_tokenizer(), TEXT)
    with_bos = calibration_batches(ids, 4, 16, bos=0)
    plain = calibration_batches(ids, 4, 16)
    _, rep = prunekit.prune(tiny_model("llama"), {"method": "wanda"}, with_bos, progress=False)
    assert rep.recipe["calibration"]["bos"] is True
    _, rep = prunekit.prune(tiny_model("llama"), {"method": "wanda"}, plain, progress=False)
    assert rep.recipe["calibration"]["bos"] is False
    with pytest.raises(PruneError, match="calibration.bos"):
        prunekit.prune(tiny_model("llama"), {"method": "wanda", "calibration": {"bos": True}}, plain, progress=False)


@pytest.fixture
def bos_dir(tiny_dir):
    d, text = tiny_dir
    bos_tokenizer().save_pretrained(d)
    return d, text


def test_cli_windows_follow_the_tokenizer(bos_dir, tmp_path):
    d, text = bos_dir
    common = ("--calib", str(text), "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--generations", "1")
    r = run("prune", str(d), "--method", "wanda", *common, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "a" / "prunekit.json").read_text())
    assert man["recipe"]["calibration"]["bos"] is True
    r = run("prune", str(d), "--method", "wanda", *common, "--no-bos", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    man_b = json.loads((tmp_path / "b" / "prunekit.json").read_text())
    assert man_b["recipe"]["calibration"]["bos"] is False
    assert man["metrics"]["perplexity_dense"] != man_b["metrics"]["perplexity_dense"]  # the windows differ
    r = run("eval", str(tmp_path / "a"), "--text", str(text), "--seqlen", "32", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bos"] is True
