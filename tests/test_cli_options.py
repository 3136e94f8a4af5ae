"""The options every command shares (cli_options.py): --out, --overwrite, --recipe, --seed, --progress/--quiet."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import invoke

COMMANDS = [["prune"], ["recover"], ["train-prune"], ["data", "score"], ["data", "select"], ["data", "train"],
            ["data", "select-for-target"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_the_shared_options(cmd):
    rc, out, _ = invoke(*cmd, "--help")
    assert rc == 0
    text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m|[│╭╮╰╯─]", " ", out))
    for flag in ("--out", "--overwrite", "--recipe", "--seed", "--quiet"):
        assert flag in text, (cmd, flag)
    assert "never an input" in text  # one description of --overwrite for all


def test_quiet_silences_bars_and_status_lines_not_results(tiny_dir, tmp_path):
    d, text = tiny_dir
    args = ["prune", d, "--method", "wanda", "--sparsity", "0.5", "--calib", text, "--calib-samples", "4",
            "--seqlen", "16", "--eval-text", "none", "--generations", "0"]
    rc, out, err = invoke(*args, "--out", tmp_path / "a")
    assert rc == 0 and "loading" in err and "%|" in err  # status lines and bars by default
    rc, out_q, err_q = invoke(*args, "--out", tmp_path / "b", "--quiet")
    assert rc == 0 and err_q.strip() == "", err_q
    assert "sparsity" in out_q and out_q.count("\n") == out.count("\n")  # the same report on stdout
    from prunekit.core.progress import is_quiet

    invoke(*args, "--out", tmp_path / "c", "--progress")
    assert not is_quiet()  # the switch is per command, not sticky


def test_quiet_and_the_old_no_progress_spelling_in_data_and_vision(tmp_path):
    from prunekit.data import load_dataset, save_scores
    from prunekit.data.scores import ScoreResult

    ds = load_dataset("digits")
    save_scores(tmp_path / "s.parquet", ds, ScoreResult("random", np.arange(len(ds), dtype=float)))
    rc, out, err = invoke("data", "select", tmp_path / "s.parquet", "--keep", "0.5", "--out", tmp_path / "k.parquet",
                          "--quiet")
    assert rc == 0 and "kept" in out and err.strip() == ""
    rc, out, err = invoke("train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0",
                          "--train-subset", "64", "--test-subset", "32", "--out", tmp_path / "v", "--no-progress")
    assert rc == 0 and "saved" in out and "%|" not in err


def test_recover_reads_a_recipe_and_flags_override_it(tiny_dir, tmp_path):
    import json

    from tests.conftest import error_line

    d, text = tiny_dir
    rc, _, err = invoke("prune", d, "--method", "magnitude", "--sparsity", "0.5", "--eval-text", "none",
                        "--generations", "0", "--out", tmp_path / "p", "--quiet")
    assert rc == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: wanda\nrecovery:\n  method: lora\n  steps: 3\n  samples: 4\n  seqlen: 16\n  text: {text}\n")
    rc, out, err = invoke("recover", tmp_path / "p", "--recipe", recipe, "--steps", "2", "--eval-text", "none",
                          "--out", tmp_path / "r", "--quiet")
    assert rc == 0, err
    rec = json.loads((tmp_path / "r" / "prunekit.json").read_text())["recovery"]
    assert rec["recipe"]["method"] == "lora" and rec["recipe"]["steps"] == 2 and rec["stats"]["steps"] == 2
    assert "lora_ranks" not in rec["stats"]
    rc, out, err = invoke("recover", tmp_path / "p", "--recipe", recipe, "--lora-ranks", "importance", "--eval-text",
                          "none", "--out", tmp_path / "ig", "--quiet")
    assert rc == 0, err
    stats = json.loads((tmp_path / "ig" / "prunekit.json").read_text())["recovery"]["stats"]
    assert sum(stats["lora_ranks"]) == 8 * len(stats["lora_ranks"])  # IG-LoRA: the same total rank, per block
    rc, _, err = invoke("recover", tmp_path / "p", "--recipe", recipe, "--lora-ranks", "importance", "--method",
                        "full", "--out", tmp_path / "ig2")
    assert rc == 2 and "trains no adapters" in error_line(err) and not (tmp_path / "ig2").exists()
    recipe.write_text("recovery:\n  stepz: 3\n")
    rc, _, err = invoke("recover", tmp_path / "p", "--recipe", recipe, "--out", tmp_path / "r2")
    assert rc == 2 and "stepz" in error_line(err)


def test_data_train_overwrites_only_its_own_run_record(tmp_path):
    import json

    from tests.conftest import error_line

    m = tmp_path / "m.json"
    args = ["data", "train", "digits", "--model", "linear", "--steps", "2", "--out", m, "--quiet"]
    assert invoke(*args)[0] == 0
    assert json.loads(m.read_text())["kind"] == "data-train"
    rc, _, err = invoke(*args)
    assert rc == 2 and "--overwrite" in error_line(err)
    assert invoke(*args, "--overwrite")[0] == 0
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"kind": "something else"}')
    rc, _, err = invoke(*args[:-3], "--out", theirs, "--overwrite")
    assert rc == 2 and theirs.read_text() == '{"kind": "something else"}'
