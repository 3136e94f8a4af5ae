"""`prunekit train-prune`: runs, run directories, bad input (exit 2, nothing written); slow real-asset checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prunekit.vision.train import evaluate, load_data, load_run

torch.set_num_threads(1)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli_subprocess(*args):
    """As a user runs it: a real process, its exit status and stderr."""
    return subprocess.run([sys.executable, "-m", "prunekit.cli", "train-prune", *args], capture_output=True, text=True)


def cli(*args):
    """In-process CLI (the same main() as the console script)."""
    from tests.conftest import invoke

    return Result(*invoke("train-prune", *args))


TINY = ["--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "64", "--no-progress"]


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.0"], "[0, 1)"),
    (["--sparsity", "-0.1"], "[0, 1)"),
    (["--schedule", "gradual", "--gradual-start", "0.6", "--gradual-end", "0.2"], "before it starts"),
    (["--allocation", "global-min", "--min-density", "0.3", "--sparsity", "0.9"], "above the target density"),
    (["--structure", "channels", "--sparsity", "1.0"], "[0, 1)"),
    (["--method", "nope"], "Unknown criterion"),
    (["--criterion", "nope"], "Unknown criterion"),
])
def test_bad_input_exit_2_nothing_written(tmp_path, args, msg):
    out = tmp_path / "run"
    r = (cli_subprocess if args[1] == "1.0" and len(args) == 2 else cli)("cnn", "--out", str(out), *TINY, *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_op_named_before_training(tmp_path):
    out = tmp_path / "run"
    r = cli_subprocess("vit", "--out", str(out), *TINY, "--structure", "channels", "--sparsity", "0.3")
    assert r.returncode == 2
    assert "TinyViT" in r.stderr and "'<root>'" in r.stderr and "dense:" not in r.stderr
    assert not out.exists()


def test_existing_output_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    r = cli("cnn", "--out", str(out), *TINY)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_train_prune_writes_a_run_that_reloads(tmp_path):
    out = tmp_path / "run"
    r = cli("cnn", "--out", str(out), *TINY, "--method", "magnitude", "--allocation", "global-min",
            "--min-density", "0.02", "--sparsity", "0.9", "--schedule", "gradual", "--prune-every", "2")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "prunekit.json", "curves.json", "curves.png"}
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["schedule"] == "gradual" and man["metrics"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    steps = man["gradual"]["steps"]
    assert [s["sparsity"] for s in steps] == sorted(s["sparsity"] for s in steps)  # sparsity only grows
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves) == 2 and {"loss", "train_acc", "test_acc", "sparsity"} <= set(curves[0])
    model, masks, _ = load_run(out)
    assert masks is not None and masks.sparsity() == pytest.approx(0.9, abs=1e-4)
    p = dict(model.named_parameters())
    assert all((p[k][~m] == 0).all() for k, m in masks.items())
    d = load_data("synthetic")
    assert evaluate(model, d["x_test"], d["y_test"]) == pytest.approx(man["metrics"]["test_acc"])


def test_channel_run_rebuilds_smaller_model(tmp_path):
    out = tmp_path / "run"
    r = cli("resnet", "--out", str(out), *TINY, "--structure", "channels", "--sparsity", "0.5", "--method", "l1")
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["channels"]["params_after"] < man["channels"]["params_before"]
    model, masks, _ = load_run(out)
    assert masks is None and sum(p.numel() for p in model.parameters()) == man["channels"]["params_after"]
    d = load_data("synthetic")
    assert evaluate(model, d["x_test"], d["y_test"]) == pytest.approx(man["metrics"]["test_acc"])


def test_recipe_file_and_flag_override(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("model: cnn\ndataset: synthetic\nmethod: synflow\nschedule: at-init\nsparsity: 0.8\n"
                   "epochs: 1\nfinetune_epochs: 0\nbatch_size: 64\nsynflow_iterations: 5\n")
    out = tmp_path / "run"
    r = cli("--recipe", str(rec), "--out", str(out), "--sparsity", "0.7", "--no-progress")
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["recipe"]["criterion"] == "synflow" and man["metrics"]["sparsity"] == pytest.approx(0.7, abs=1e-4)


@pytest.mark.slow
def test_real_efficientnet_lite0_classifies_photos_and_prunes_equivalently():
    from prunekit.vision.channels import prune_channels
    from prunekit.vision.models import efficientnet_lite0, sample_photos

    names, photos = sample_photos()
    model = efficientnet_lite0(pretrained=True)
    with torch.no_grad():
        top = model(photos).argmax(1)
    pred = dict(zip(names, top.tolist()))
    assert pred["chelsea"] in (281, 282, 283, 284, 285)  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert pred["coffee"] in (967, 968)  # espresso / cup
    rep = prune_channels(model, photos[:1], 0.3)  # verified: removal equals zeroing on a real photo
    assert rep["verify_max_abs_diff"] < 1e-4 and rep["params_after"] < 0.7 * rep["params_before"]


@pytest.mark.slow
def test_fashion_mnist_short_run(tmp_path):
    out = tmp_path / "run"
    r = cli("cnn", "--out", str(out), "--train-subset", "1000", "--test-subset", "500", "--epochs", "1",
            "--finetune-epochs", "1", "--sparsity", "0.8", "--method", "magnitude", "--allocation", "lamp",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "prunekit.json").read_text())
    assert man["metrics"]["test_acc"] > 0.5  # well above chance (0.1) after a few hundred steps


def test_bundled_recipes_are_valid():
    from pathlib import Path

    from prunekit.vision.cli import _read_recipe, bundled_recipes
    from prunekit.vision.train import make_config

    names = bundled_recipes()
    assert {"global-mp", "gradual-cubic", "lottery-ticket", "synflow-at-init", "precrop-snip", "lite0-channels"} <= set(names)
    for n in names:
        make_config(**_read_recipe(Path(n)))
