"""`prunekit compare` and prunekit.vision.compare: linear CKA, agreement, corruptions, decision planes, the LMC
barrier and the three-regime diagnosis; the CLI on two tiny synthetic runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruneError
from prunekit.vision import compare as C
from prunekit.zoo.nets import SmallCNN

torch.set_num_threads(1)


def _x(n=60, d=20, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- CKA ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(60, 20), (8, 50)])  # feature form (n^2 > d^2) and Gram form
def test_cka_self_orthogonal_and_isotropic_invariance(n, d):
    x = _x(n, d)
    q, _ = torch.linalg.qr(_x(d, d, 1))
    assert C.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert C.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)
    assert C.linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert C.linear_cka(x, -0.2 * (x @ q) + 5.0) == pytest.approx(1.0, abs=1e-10)  # a shift is centred away
    # not invariant to a non-isotropic scaling of the features
    s = torch.linspace(0.1, 10, d, dtype=torch.float64)
    assert C.linear_cka(x, x * s) < 0.99


def test_cka_independent_features_below_one_and_one_feature_is_squared_correlation():
    x, y = _x(400, 10, 2), _x(400, 10, 3)
    v = C.linear_cka(x, y)
    assert 0.0 < v < 0.2  # ~ d/n for independent features
    a, b = _x(50, 1, 4), _x(50, 1, 5)
    b = 0.6 * a + b
    r = torch.corrcoef(torch.cat([a, b], 1).T)[0, 1]
    assert C.linear_cka(a, b) == pytest.approx(float(r) ** 2, rel=1e-10)
    # the feature form and the Gram form agree; widths may differ
    x2, y2 = _x(30, 40, 6), _x(30, 3, 7)
    assert C.linear_cka(x2, y2) == pytest.approx(C.cka_from_grams(x2 @ x2.T, y2 @ y2.T), rel=1e-9)
    assert math.isnan(C.linear_cka(torch.ones(5, 3), _x(5, 2)))  # a constant representation: undefined
    with pytest.raises(PruneError, match="same examples"):
        C.linear_cka(_x(5, 2), _x(6, 2))


def test_layer_cka_self_is_one_and_different_widths_compare():
    torch.manual_seed(0)
    a, b = SmallCNN(width=4).eval(), SmallCNN(width=2).eval()
    x = torch.randn(24, 1, 28, 28)
    self_ = C.layer_cka(a, a, x)
    assert list(self_) == ["features.0", "features.3", "features.7", "features.10", "classifier.1", "classifier.3"]
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in self_.values())
    other = C.layer_cka(a, b, x, budget_mb=0.01)  # one layer per pass: the same values as all at once
    assert set(other) == set(self_) and all(0 < v < 1 for v in other.values())
    assert other == pytest.approx(C.layer_cka(a, b, x), abs=1e-9)
    assert other["features.0"] == pytest.approx(C.linear_cka(a.features[0](x), b.features[0](x)), abs=1e-6)


def test_agreement():
    torch.manual_seed(0)
    a, b = SmallCNN(width=4).eval(), SmallCNN(width=4).eval()
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    r = C.agreement(a, a, x, y)
    assert r["agreement"] == 1.0 and r["acc_a"] == r["acc_b"]
    r2 = C.agreement(a, b, x, y)
    pa, pb = a(x).argmax(1), b(x).argmax(1)
    assert r2["agreement"] == pytest.approx(float((pa == pb).float().mean()))
    assert r2["acc_b"] == pytest.approx(float((pb == y).float().mean()))


# -- corruptions ----------------------------------------------------------------------------------------------

def test_corruptions_severity_zero_unchanged_and_deterministic():
    img = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for kind in C.CORRUPTIONS.names():
        assert torch.equal(C.corrupt(img, kind, 0), img)
        one = C.corrupt(img, kind, 1, seed=3)
        assert one.shape == img.shape and 0 <= float(one.min()) and float(one.max()) <= 1
        assert not torch.equal(one, img), kind
        assert torch.equal(one, C.corrupt(img, kind, 1, seed=3)), kind
    for kind in ("gaussian-noise", "shot-noise", "impulse-noise"):
        assert not torch.equal(C.corrupt(img, kind, 1, seed=3), C.corrupt(img, kind, 1, seed=4))
    with pytest.raises(PruneError, match="Unknown corruption"):
        C.corrupt(img, "fog", 1)
    with pytest.raises(PruneError, match="0..5"):
        C.corrupt(img, "contrast", 6)


def test_corruptions_at_severity_one_as_specified():
    grey = torch.full((64, 1, 28, 28), 0.5)
    d = C.corrupt(grey, "gaussian-noise", 1) - grey
    assert float(d.std()) == pytest.approx(0.04, rel=0.03) and abs(float(d.mean())) < 1e-3
    s = C.corrupt(grey, "shot-noise", 1)  # Poisson(0.5 * 500) / 500
    assert float(s.mean()) == pytest.approx(0.5, abs=1e-3)
    assert float(s.std()) == pytest.approx(math.sqrt(250) / 500, rel=0.03)
    assert torch.allclose(s * 500, (s * 500).round(), atol=1e-3)
    i = C.corrupt(grey, "impulse-noise", 1)
    changed = i != grey
    assert float(changed.float().mean()) == pytest.approx(0.01, rel=0.15)
    assert set(i[changed].unique().tolist()) == {0.0, 1.0}
    img = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    m = img.mean((2, 3), keepdim=True)
    assert torch.allclose(C.corrupt(img, "contrast", 1), ((img - m) * 0.75 + m).clamp(0, 1))
    assert torch.allclose(C.corrupt(img, "brightness", 1), (img + 0.05).clamp(0, 1))
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5  # value + c, hue and saturation kept
    b = C.corrupt(rgb, "brightness", 2)
    assert torch.allclose(b.max(1).values, rgb.max(1).values + 0.1, atol=1e-6)
    assert torch.allclose(b / b.max(1, keepdim=True).values, rgb / rgb.max(1, keepdim=True).values, atol=1e-5)
    # blur: a delta becomes the separable Gaussian of sigma 0.4 (radius int(4 sigma + 0.5) = 2), mass kept
    delta = torch.zeros(1, 1, 28, 28)
    delta[0, 0, 14, 14] = 1.0
    bl = C.corrupt(delta, "gaussian-blur", 1)
    k = torch.tensor([math.exp(-t * t / (2 * 0.4 ** 2)) for t in range(-2, 3)])
    k = k / k.sum()
    assert torch.allclose(bl[0, 0, 12:17, 12:17], torch.outer(k, k), atol=1e-6)
    assert float(bl.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(C.corrupt(grey, "gaussian-blur", 5), grey)
    # pixelate: box-averaged to int(28 * 0.95) = 26 (severity 5: 18) per side, blown up again
    p1, p5 = C.corrupt(img, "pixelate", 1), C.corrupt(img, "pixelate", 5)
    assert all(len(row.unique()) <= 26 for row in p1[0, 0])
    assert all(len(row.unique()) <= 18 for row in p5[0, 0])
    assert float(p5.mean()) == pytest.approx(float(img.mean()), abs=0.02)
    assert torch.allclose(C.corrupt(grey, "pixelate", 3), grey)


def test_corruption_robustness_counts_accuracy():
    torch.manual_seed(0)
    model = SmallCNN(width=4).eval()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    r = C.corruption_robustness(model, x, y, ["contrast", "gaussian_noise"], (1, 3), mean=0.3, std=0.4, seed=1)
    pix = (x * 0.4 + 0.3).clamp(0, 1)
    want = float((model((C.corrupt(pix, "contrast", 3, 1) - 0.3) / 0.4).argmax(1) == y).float().mean())
    assert r["accuracy"]["contrast"]["3"] == pytest.approx(want)
    assert set(r["accuracy"]) == {"contrast", "gaussian-noise"}
    assert r["mean"]["contrast"] == pytest.approx((r["accuracy"]["contrast"]["1"] + want) / 2)
    assert r["clean"] == pytest.approx(float((model(x).argmax(1) == y).float().mean()))


# -- decision planes ------------------------------------------------------------------------------------------

class _PastMidpoint(nn.Module):
    """Class 1 beyond the midpoint from x0 to x1 (along x1 - x0), else class 0."""

    def __init__(self, x0, x1):
        super().__init__()
        self.x0, self.v = x0.flatten(), (x1 - x0).flatten()

    def forward(self, x):
        s = (x.flatten(1) - self.x0) @ self.v / (self.v @ self.v) - 0.5
        return torch.stack([-s, s], 1)


class _Const(nn.Module):
    def forward(self, x):
        return torch.tensor([1.0, 0.0]).expand(len(x), 2)


def test_decision_plane_geometry(tmp_path):
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 1, 6, 6, generator=g)
    a, b = _PastMidpoint(anchors[0], anchors[1]), _Const()
    pl = C.decision_plane(a, b, anchors, resolution=21, margin=0.2)
    n1 = float((anchors[1] - anchors[0]).norm())
    assert pl["anchors_xy"][1] == pytest.approx((n1, 0.0))
    beyond = torch.tensor(pl["axis_a"]) > n1 / 2
    assert torch.equal(pl["pred_a"], beyond.long().expand(21, 21))  # columns past the midpoint are class 1
    assert pl["disagreement"] == pytest.approx(float(beyond.float().mean()))
    same = C.decision_plane(a, a, anchors, resolution=9)
    assert same["disagreement"] == 0.0
    rnd = C.decision_plane(a, b, anchors[:1], resolution=9, radius=2.0, seed=1)
    assert rnd["axis_a"][0] == pytest.approx(-2.0) and len(rnd["axis_b"]) == 9
    fig = C.plot_planes([pl, rnd], tmp_path / "p.png", num_classes=2)
    assert (tmp_path / "p.png").stat().st_size > 1000 and len(fig.axes) == 6
    with pytest.raises(PruneError, match="one line"):
        C.decision_plane(a, b, torch.stack([anchors[0], anchors[1], 2 * anchors[1] - anchors[0]]))


# -- LMC barrier and the three regimes ------------------------------------------------------------------------

def _double_well(w):
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


def _well_loss(out, y):
    return ((out.squeeze(-1) ** 2 - 1) ** 2).mean()


def test_lmc_barrier_by_hand_on_a_double_well():
    data = {"x_train": torch.ones(4, 1), "y_train": torch.zeros(4, dtype=torch.long),
            "x_test": torch.randn(8, 1, generator=torch.Generator().manual_seed(0))}
    a, b = _double_well(-1.0), _double_well(1.0)
    r = C.lmc_barrier(a, b, data, alphas=11, loss_fn=_well_loss)
    want = [((2 * t - 1) ** 2 - 1) ** 2 for t in r["alphas"]]  # loss(w) = (w^2 - 1)^2 along w = -1 + 2 alpha
    assert r["losses"] == pytest.approx(want, abs=1e-6)
    assert r["barrier"] == pytest.approx(1.0, abs=1e-6) and r["barrier_alpha"] == 0.5
    # ends at different heights: the excess over the line through the end losses
    c = _double_well(0.5)
    r2 = C.lmc_barrier(a, c, data, alphas=[0.0, 0.25, 0.5, 1.0], loss_fn=_well_loss)
    ws = [-1 + 1.5 * t for t in (0, 0.25, 0.5, 1)]
    ls = [(w * w - 1) ** 2 for w in ws]
    assert r2["barrier"] == pytest.approx(max(l - (1 - t) * ls[0] - t * ls[-1] for t, l in zip((0, .25, .5, 1), ls)), abs=1e-6)
    reg = C.three_regime(a, b, data, loss_fn=_well_loss, barrier_threshold=0.5, temperature={"epochs": 3}, load=0.1)
    assert reg["regime"] == "I" and "regime I (poorly connected)" in C.regime_line(reg)
    assert "epochs=3" in C.regime_line(reg) and "load (density) 0.1" in C.regime_line(reg)


def test_lmc_self_is_zero_and_random_models_along_the_line():
    from prunekit.vision.data import load_data
    from prunekit.vision.train import recalibrate_bn

    data = load_data("synthetic", 64, 32, 0)
    torch.manual_seed(0)
    a, b = SmallCNN(width=4), SmallCNN(width=4)
    kw = dict(examples=48, bn_batches=2, batch_size=16, seed=0)
    r = C.lmc_barrier(a, a, data, alphas=3, **kw)
    assert r["barrier"] == 0.0 and len(set(r["losses"])) == 1
    r2 = C.lmc_barrier(a, b, data, alphas=[0.0, 0.5, 1.0], **kw)
    mid = C.interpolate(a, b, 0.5)
    sa, sb, sm = a.state_dict(), b.state_dict(), mid.state_dict()
    assert torch.allclose(sm["features.0.weight"], (sa["features.0.weight"] + sb["features.0.weight"]) / 2)
    recalibrate_bn(mid, data, 2, 16, 0)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(13))[:48]
    with torch.no_grad():
        want = float(F.cross_entropy(mid.eval()(data["x_train"][idx]), data["y_train"][idx]))
    assert r2["losses"][1] == pytest.approx(want, rel=1e-5)
    lin = [(1 - t) * r2["losses"][0] + t * r2["losses"][2] for t in (0, 0.5, 1)]
    assert r2["barrier"] == pytest.approx(max(l - m for l, m in zip(r2["losses"], lin)))
    assert torch.equal(a.state_dict()["features.1.running_mean"], sa["features.1.running_mean"])  # inputs untouched
    assert C.three_regime(a, a, data, alphas=3, similarity="agreement", similarity_threshold=1.0, **kw)["regime"] == "II-B"
    far = C.three_regime(a, b, data, alphas=3, barrier_threshold=1e6, similarity_threshold=1.0, **kw)
    assert far["regime"] == "II-A" and far["similarity"] < 1.0
    with pytest.raises(PruneError, match="same architecture"):
        C.lmc_barrier(a, SmallCNN(width=2), data, alphas=3, **kw)


# -- the command ----------------------------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "64",
        "--train-subset", "128", "--test-subset", "64", "--sparsity", "0.5", "--quiet"]
FAST = ["--test-subset", "48", "--cka-examples", "32", "--plane-resolution", "7", "--severities", "1",
        "--corruptions", "gaussian-noise,contrast", "--lmc-points", "3", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.conftest import invoke

    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "0"), ("b", "1")):
        rc, _, err = invoke("train-prune", "cnn", "--out", root / name, *TINY, "--seed", seed)
        assert rc == 0, err
    return root


def test_compare_cli_writes_json_and_plots(runs, tmp_path):
    from tests.conftest import invoke

    out = tmp_path / "cmp"
    rc, stdout, err = invoke("compare", runs / "a", runs / "b", "--out", out, "--regime", *FAST)
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} == {"compare.json", "cka.png", "corruptions.png", "plane.png", "lmc.png"}
    doc = json.loads((out / "compare.json").read_text())
    assert doc["test_images"] == 48 and len(doc["cka"]) == 6
    assert all(0 < v <= 1 for v in doc["cka"].values())
    assert 0 <= doc["agreement"]["agreement"] <= 1
    assert set(doc["corruptions"]["a"]["accuracy"]) == {"gaussian-noise", "contrast"}
    assert len(doc["plane"]["planes"]) == 3 and 0 <= doc["plane"]["disagreement"] <= 1
    reg = doc["regime"]
    assert reg["regime"] in ("I", "II-A", "II-B") and reg["load"] == pytest.approx([0.5, 0.5], abs=1e-3)
    assert reg["temperature"] == {"epochs (A)": 1, "epochs (B)": 1} and len(reg["lmc"]["losses"]) == 3
    assert "linear CKA" in stdout and f"regime {reg['regime']}" in stdout and "gaussian-noise" in stdout
    # a run against itself: identical in every view
    rc, stdout, err = invoke("compare", runs / "a", runs / "a", "--regime", *FAST, "--temperature", "lr/batch_size")
    assert rc == 0, err
    assert "top-1 agreement 1.0000" in stdout and "disagree on 0.0%" in stdout
    assert "regime II-B" in stdout and "LMC barrier 0.0000" in stdout and "lr/batch_size (A)=0.00078125" in stdout


def test_compare_bad_input_exit_2(runs, tmp_path):
    from tests.conftest import invoke

    other = tmp_path / "other"
    other.mkdir()
    (other / "prunekit.json").write_text(json.dumps({"kind": "llm", "recipe": {}}))
    (other / "model.safetensors").write_bytes(b"")
    moved = tmp_path / "moved"
    moved.mkdir()
    man = json.loads((runs / "a" / "prunekit.json").read_text())
    man["recipe"]["dataset"] = "fashion-mnist"
    (moved / "prunekit.json").write_text(json.dumps(man))
    (moved / "model.safetensors").write_bytes((runs / "a" / "model.safetensors").read_bytes())
    out = tmp_path / "cmp"
    cases = [
        ((tmp_path / "missing", runs / "b"), "does not exist"),
        ((runs / "a", tmp_path), "not a prunekit vision run"),
        ((runs / "a", other), "not a vision run"),
        ((runs / "a", moved), "different inputs"),
        ((runs / "a", runs / "b", "--corruptions", "fog"), "Unknown corruption 'fog'"),
        ((runs / "a", runs / "b", "--severities", "0,9"), "1..5"),
        ((runs / "a", runs / "b", "--regime", "--temperature", "nope"), "--temperature"),
    ]
    for args, msg in cases:
        rc, _, err = invoke("compare", *args, "--out", out, "--quiet")
        assert rc == 2, (args, err)
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    out.mkdir()
    rc, _, err = invoke("compare", runs / "a", runs / "b", "--out", out, "--quiet")
    assert rc == 2 and "already exists" in err and list(out.iterdir()) == []
