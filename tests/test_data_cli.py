"""`prunekit data score|select|train` as a user runs it, user data loaders, and bad input: exit 2, one
sentence on stderr, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prunekit.data import load_dataset, load_keep, load_scores
from prunekit.errors import PruneError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Data tests train small models: one torch thread (tests/conftest.py)."""


def cli(monkeypatch, capsys, *args):
    """Run prunekit's real entry point (main(): PruneError -> one sentence, exit 2) in this process."""
    from tests.conftest import invoke

    return invoke("data", *args)


def test_score_select_train_subprocess(tmp_path):
    """The full pipeline through the installed entry point, on digits."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "prunekit.cli", "data", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, env=env)
    s, k, m = tmp_path / "scores.parquet", tmp_path / "keep.parquet", tmp_path / "metrics.json"
    r = run("score", "digits", "--score", "aum", "--seeds", "1", "--epochs", "3", "--model", "mlp", "--out", s)
    assert r.returncode == 0, r.stderr
    r = run("select", s, "--keep", "0.3", "--strategy", "ccs", "--beta", "0.1", "--out", k)
    assert r.returncode == 0, r.stderr
    assert "kept 404 of 1,347" in r.stdout
    r = run("train", "digits", "--subset", k, "--model", "mlp", "--epochs", "10", "--distill", "--out", m)
    assert r.returncode == 0, r.stderr
    res = json.loads(m.read_text())
    assert res["kind"] == "data-train" and res["schema"] == 1 and res["recipe"]["distill"] and res["recipe"]["teacher"]
    assert res["metrics"]["kept"] == 404 and 0.5 < res["metrics"]["test_accuracy"] <= 1
    assert 0.5 < res["metrics"]["teacher_test_accuracy"] <= 1 and res["timings"]["train_seconds"] > 0


def test_score_file_contents(monkeypatch, capsys, tmp_path):
    out = tmp_path / "p.parquet"
    code, stdout, err = cli(monkeypatch, capsys, "score", "digits", "--score", "prototype", "--encoder", "pca",
                            "--clusters", "5", "--out", out)
    assert code == 0, err
    cols, meta = load_scores(out)
    n = len(load_dataset("digits"))
    assert len(cols["score"]) == n and cols["embedding"].shape[0] == n and cols["cluster"].max() == 4
    assert meta["dataset"] == "digits" and meta["score"] == "prototype" and meta["n"] == n
    k = tmp_path / "k.parquet"
    code, stdout, err = cli(monkeypatch, capsys, "select", out, "--keep", "0.5", "--strategy", "dbp", "--out", k)
    assert code == 0, err
    idx, kmeta = load_keep(k, n=n)
    assert len(idx) == round(0.5 * n) and kmeta["strategy"] == "dbp"
    code, stdout, err = cli(monkeypatch, capsys, "select", out, "--eps", "0.05", "--strategy", "semdedup", "--out", k)
    assert code == 2 and "--overwrite" in err  # an existing output is never replaced silently
    code, stdout, err = cli(monkeypatch, capsys, "select", out, "--eps", "0.05", "--strategy", "semdedup", "--out", k,
                            "--overwrite")
    assert code == 0, err
    assert "by semdedup" in stdout


def bad_cases(tmp_path):
    scores = tmp_path / "s.parquet"
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,label\nhello,1\n")
    return scores, [
        (["select", scores, "--keep", "1.5", "--out", "OUT"], "keep fraction must be in (0, 1]"),
        (["select", scores, "--keep", "0", "--out", "OUT"], "keep fraction must be in (0, 1]"),
        (["select", scores, "--keep", "0.3", "--strategy", "median", "--out", "OUT"], "Unknown strategy"),
        (["select", scores, "--keep", "0.5", "--strategy", "ccs", "--beta", "0.6", "--out", "OUT"], "beta + keep > 1"),
        (["select", scores, "--keep", "0.5", "--strategy", "dbp", "--out", "OUT"], "--score prototype"),
        (["score", empty, "--score", "random", "--out", "OUT"], "No images found"),
        (["score", csv, "--score", "random", "--out", "OUT"], "no column 'text'"),
        (["score", csv, "--text-column", "sentence", "--label-column", "y", "--score", "random", "--out", "OUT"], "no column 'y'"),
        (["score", "digits", "--score", "nope", "--out", "OUT"], "Unknown score"),
        (["score", "no-such-set", "--score", "random", "--out", "OUT"], "neither a built-in"),
        (["score", "digits", "--score", "random", "--engine", "spark", "--out", "OUT"], "Unknown engine"),
        (["train", "digits", "--subset", "KEEP_FASHION", "--out", "OUT"], "data set has 1347"),
        (["train", "digits", "--subset", scores, "--out", "OUT"], "not a prunekit subset file"),
    ]


def test_bad_input_exit_2_one_sentence_nothing_written(monkeypatch, capsys, tmp_path):
    scores, cases = bad_cases(tmp_path)
    assert cli(monkeypatch, capsys, "score", "digits", "--score", "random", "--out", scores)[0] == 0
    # a subset selected from another data set's 60k scores
    from prunekit.data import save_keep

    keep_other = tmp_path / "other.parquet"
    save_keep(keep_other, np.arange(10), 60000, {"dataset": "fashion-mnist"})
    for args, phrase in cases:
        out = tmp_path / ("out.json" if args[0] == "train" else "out.parquet")
        args = [keep_other if a == "KEEP_FASHION" else out if a == "OUT" else a for a in args]
        code, stdout, err = cli(monkeypatch, capsys, *args)
        assert code == 2, (args, code, err)
        assert phrase in err, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
        assert not out.exists(), args
        assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_user_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path), image_size=16)
    assert ds.x.shape == (6, 16, 16, 3) and ds.y.tolist() == [0, 0, 0, 1, 1, 1] and ds.classes == ["cat", "dog"]


def test_user_arrays_and_text(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array(["a", "b"] * 10))
    ds = load_dataset(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))
    assert ds.kind == "array" and ds.x.shape == (20, 5) and ds.y.tolist()[:2] == [0, 1]
    np.save(tmp_path / "bad_y.npy", np.arange(3))
    with pytest.raises(PruneError, match="one label per example"):
        load_dataset(str(tmp_path / "x.npy"), labels=str(tmp_path / "bad_y.npy"))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 4)
    assert load_dataset(str(tmp_path / "d.npz")).num_classes == 4
    (tmp_path / "t.jsonl").write_text('{"text": "a cat", "label": "pos"}\n{"text": "a dog", "label": "neg"}\n')
    ds = load_dataset(str(tmp_path / "t.jsonl"))
    assert ds.kind == "text" and ds.texts == ["a cat", "a dog"] and ds.classes == ["neg", "pos"]
    (tmp_path / "u.csv").write_text("body\nx\ny\n")
    ds = load_dataset(str(tmp_path / "u.csv"), text_column="body")
    assert ds.y is None and len(ds) == 2


def test_array_data_scores_with_an_mlp(tmp_path):
    """User feature arrays: the default model is an MLP; planted mislabeled rows score hardest."""
    from prunekit.data import ScoreConfig, score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = (np.eye(3)[y] * 3 + rng.normal(size=(600, 3))).astype(np.float32)
    bad = rng.choice(600, 30, replace=False)
    y[bad] = (y[bad] + 1) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"))
    res = score(ds, "el2n", ScoreConfig(seeds=2, epochs=5))
    assert np.isin(np.argsort(-res.values)[:30], bad).mean() >= 0.7


def test_data_recipe_file_and_flag_override(monkeypatch, capsys, tmp_path):
    scores = tmp_path / "s.parquet"
    assert cli(monkeypatch, capsys, "score", "digits", "--score", "random", "--out", scores)[0] == 0
    r = tmp_path / "select.yaml"
    r.write_text("keep: 0.3\nstrategy: ccs\nclass-balanced: true\n")
    code, out, err = cli(monkeypatch, capsys, "select", scores, "--recipe", r, "--out", tmp_path / "a.parquet")
    assert code == 0, err
    assert "30.0%" in out and "by ccs" in out
    code, out, err = cli(monkeypatch, capsys, "select", scores, "--recipe", r, "--keep", "0.5", "--out", tmp_path / "b.parquet")
    assert code == 0 and "50.0%" in out and "by ccs" in out  # the flag wins over the file
    r.write_text("kep: 0.3\n")
    code, _, err = cli(monkeypatch, capsys, "select", scores, "--recipe", r, "--out", tmp_path / "c.parquet")
    assert code == 2 and "unknown field 'kep'" in err and not (tmp_path / "c.parquet").exists()
