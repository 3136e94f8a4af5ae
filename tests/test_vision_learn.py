"""The learned-method extension point of train-prune: ``learn`` dispatch, ``options`` routed to the chosen entries,
``--option KEY=VALUE``, the regularizer hook of ``train_epochs``, a learner's run saved and loaded back."""

from __future__ import annotations

import pytest
import torch

from prunekit.core.config import Config
from prunekit.errors import PruneError
from prunekit.vision.learn import LEARNED
from prunekit.vision.train import make_config, train_epochs, train_prune

torch.set_num_threads(1)


class _Opts(Config):
    what = "probe options"
    scale: float = 1.0


def _probe(cfg, model, data, ctx):
    """A learner for the tests: trains with an L2 penalty of ``scale`` through the hook, records what it saw."""
    seen = []

    def reg(m):
        seen.append(1)
        return ctx.options.scale * sum((p ** 2).sum() for p in m.parameters())

    train_epochs(model, data, cfg.epochs, cfg, None, "probe", ctx.history, progress=False, journey=ctx.journey,
                 regularizer=reg)
    ctx.info["learn"] = {"scale": ctx.options.scale, "steps_regularized": len(seen)}
    return model, None


@pytest.fixture(scope="module", autouse=True)
def probe_entry():
    LEARNED.register("probe-learner", _probe, params=_Opts, description="test only")
    yield
    LEARNED._entries.pop("probe-learner")


def test_options_go_to_the_chosen_entry_and_unknown_ones_are_refused():
    cfg = make_config(learn="probe-learner", options={"scale": 0.5})
    assert cfg.options_for(LEARNED, "probe-learner").scale == 0.5
    assert make_config(learn="probe-learner").options == {"scale": 1.0}  # defaults filled
    with pytest.raises(PruneError, match="takes the option 'nope'"):
        make_config(learn="probe-learner", options={"nope": 1})
    with pytest.raises(PruneError, match="takes the option 'scale'"):
        make_config(options={"scale": 1})  # no learner chosen: nobody takes it
    with pytest.raises(PruneError, match="scale"):
        make_config(learn="probe-learner", options={"scale": "big"})
    with pytest.raises(PruneError, match="runs its own schedule"):
        make_config(learn="probe-learner", schedule="gradual")
    with pytest.raises(PruneError, match="Unknown learned method 'nope'"):
        make_config(learn="nope")


def test_learner_runs_with_the_regularizer_and_its_run_loads_back(tmp_path):
    from prunekit.vision.train import load_data, load_run, save_run

    data = load_data("synthetic", 128, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, batch_size=64, learn="probe-learner",
                      options={"scale": 1e-3})
    model, masks, info = train_prune(cfg, progress=False, data=data)
    assert masks is None and info["learn"] == {"scale": 1e-3, "steps_regularized": 2}
    assert info["journey"]["steps"] == 2
    save_run(tmp_path / "run", model, cfg, masks, info)
    back, _, manifest = load_run(tmp_path / "run")
    assert manifest["learn"]["scale"] == 1e-3 and manifest["recipe"]["learn"] == "probe-learner"
    x = data["x_test"][:8]
    torch.testing.assert_close(back(x), model.eval()(x))


def test_regularizer_changes_the_training():
    from prunekit.vision.models import build_model
    from prunekit.vision.train import load_data

    data = load_data("synthetic", 128, 64, 0)
    cfg = make_config(model="cnn", dataset="synthetic", epochs=1, batch_size=64)
    norms = []
    for reg in (None, lambda m: 10.0 * sum((p ** 2).sum() for p in m.parameters())):
        torch.manual_seed(0)
        m = build_model("cnn")
        train_epochs(m, data, 1, cfg, None, progress=False, regularizer=reg)
        norms.append(float(sum((p.detach() ** 2).sum() for p in m.parameters())))
    assert norms[1] < 0.9 * norms[0]  # a strong L2 penalty through the hook shrinks the weights


def test_option_flag_parses_values_and_refuses_malformed_ones():
    from prunekit.vision.cli import parse_options

    assert parse_options(["scale=0.5", "rule=epsilon", "n-rounds=3", "xs=[1, 2]"]) == {
        "scale": 0.5, "rule": "epsilon", "n_rounds": 3, "xs": [1, 2]}
    with pytest.raises(PruneError, match="KEY=VALUE"):
        parse_options(["scale"])


def test_cli_option_reaches_the_learner_and_mistakes_exit_2(tmp_path):
    import json

    from tests.conftest import error_line, invoke

    args = ["train-prune", "cnn", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "64",
            "--test-subset", "32", "--learn", "probe-learner", "--quiet"]
    rc, out, err = invoke(*args, "--option", "scale=0.25", "--out", tmp_path / "r")
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "prunekit.json").read_text())["learn"]["scale"] == 0.25
    rc, _, err = invoke(*args, "--option", "scale", "--out", tmp_path / "r2")
    assert rc == 2 and "KEY=VALUE" in error_line(err) and not (tmp_path / "r2").exists()
    rc, _, err = invoke(*args, "--option", "lam=1", "--out", tmp_path / "r3")
    assert rc == 2 and "'lam'" in error_line(err) and not (tmp_path / "r3").exists()
