"""Channel pruning on the dependency graph: removal equals zeroing, shapes rebuild, bad input named."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.vision.channels import (output_modules, precrop_ratios, prune_channels, rebuild, shapes_of)
from prunekit.vision.models import ConcatNet, EfficientNetLite0, SmallCNN, SmallResNet, TinyViT

torch.set_num_threads(1)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so that a wrongly removed channel shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def manual_prune_and_zero(model, example, ratio):
    """Independent of prune_channels: walk Torch-Pruning's groups; in a copy, zero the BatchNorm affine terms of
    the channels each group removes (their activations are then exactly zero everywhere they flow), then remove
    them from the model. Returns the zeroed copy."""
    import torch_pruning as tp

    zeroed = copy.deepcopy(model)
    names = {m: n for n, m in model.named_modules()}
    zmods = dict(zeroed.named_modules())
    pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=output_modules(model, example))
    n_groups = 0
    for group in pruner.step(interactive=True):
        n_groups += 1
        for dep, idxs in group:
            mod = dep.target.module
            if isinstance(mod, nn.BatchNorm2d):
                idx = torch.tensor([int(getattr(i, "idx", i)) for i in idxs])
                with torch.no_grad():
                    zmods[names[mod]].weight[idx] = 0
                    zmods[names[mod]].bias[idx] = 0
        group.prune()
    assert n_groups > 0
    return zeroed


@pytest.mark.parametrize("factory,shape", [(lambda: SmallResNet(10, 8), (2, 1, 28, 28)),
                                           (lambda: EfficientNetLite0(1000), (1, 3, 48, 48))])
def test_removal_equals_zeroing(factory, shape):
    torch.manual_seed(0)
    model = randomize_norms(factory())
    x = torch.randn(*shape)
    with torch.no_grad():
        dense_out = model(x)
    n0 = sum(p.numel() for p in model.parameters())
    zeroed = manual_prune_and_zero(model, x, 0.4)
    with torch.no_grad():
        pruned_out, zeroed_out = model(x), zeroed(x)
    assert sum(p.numel() for p in model.parameters()) < 0.8 * n0  # really smaller
    assert not torch.allclose(zeroed_out, dense_out, atol=1e-3)  # zeroing changed the function...
    assert torch.allclose(pruned_out, zeroed_out, atol=1e-4, rtol=1e-4)  # ...and removal equals it


def test_prune_channels_shrinks_residual_depthwise_concat_and_verifies():
    torch.manual_seed(0)
    for model, x in ((randomize_norms(SmallResNet(10, 8)), torch.randn(2, 1, 28, 28)),
                     (randomize_norms(ConcatNet(10, 8)), torch.randn(2, 1, 28, 28)),
                     (randomize_norms(EfficientNetLite0(1000)), torch.randn(1, 3, 40, 40))):
        ref = copy.deepcopy(model)
        rep = prune_channels(model, x, 0.5, "magnitude")
        assert rep["params_after"] < rep["params_before"]
        assert rep["verify_max_abs_diff"] < 1e-4
        # residual adds stay consistent, classifiers keep their outputs
        with torch.no_grad():
            assert model(x).shape == ref(x).shape
    # the ResNet's residual stream and depthwise convs really shrank
    r = SmallResNet(10, 8)
    prune_channels(r, torch.randn(1, 1, 28, 28), 0.5)
    assert r.stem[0].out_channels == 4 and r.layers[0].conv2.out_channels == 4
    e = EfficientNetLite0(1000).eval()
    prune_channels(e, torch.randn(1, 3, 32, 32), 0.5)
    dw = e._blocks[1]._depthwise_conv
    assert dw.groups == dw.in_channels == dw.out_channels == e._blocks[1]._expand_conv.out_channels < 96
    assert e._fc.out_features == 1000


@pytest.mark.parametrize("crit", ["snip", "synflow", "taylor", "lamp", "random", "l1"])
def test_prunekit_criteria_as_channel_importance(crit):
    torch.manual_seed(0)
    model = randomize_norms(SmallResNet(10, 8))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    rep = prune_channels(model, x, 0.5, crit, batches=[(x, y)])
    assert rep["params_after"] < rep["params_before"] and rep["verify_max_abs_diff"] < 1e-4


def test_verification_catches_a_wrong_removal(monkeypatch):
    """If removal did not match zeroing (a mis-handled op), prune_channels must refuse."""
    import prunekit.vision.channels as ch

    monkeypatch.setattr(ch, "zero_channels", lambda *a, **k: None)  # reference no longer zeroes anything
    with pytest.raises(PruneError, match="changed the outputs"):
        prune_channels(randomize_norms(SmallResNet(10, 8)), torch.randn(2, 1, 28, 28), 0.5)


def test_rebuild_from_saved_shapes_without_pickle(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = randomize_norms(EfficientNetLite0(1000))
    x = torch.randn(1, 3, 32, 32)
    prune_channels(model, x, 0.3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    shapes = shapes_of(model)
    fresh = rebuild(EfficientNetLite0(1000), shapes).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_channel_input():
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(PruneError, match="at least 1 channel"):
        prune_channels(SmallCNN(10, 4), x, 1.0)
    with pytest.raises(PruneError, match="at least 1 channel"):
        prune_channels(SmallCNN(10, 4), x, 0.2, ratio_dict={"features.0": 1.5})
    with pytest.raises(PruneError, match="No module named"):
        prune_channels(SmallCNN(10, 4), x, 0.2, ignore=["nope"])
    with pytest.raises(PruneError, match=r"op TinyViT \(module '<root>'"):
        prune_channels(TinyViT(), x, 0.2)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, h):
            return h * self.scale[None, :, None, None]

    net = nn.Sequential(nn.Conv2d(1, 4, 3), Custom(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 24 * 24, 3))
    with pytest.raises(PruneError, match=r"op Custom \(module '1'"):
        prune_channels(net, x, 0.5)


def test_precrop_ratios_follow_density():
    r = precrop_ratios(SmallCNN(), {"features.0.weight": 1.0, "features.3.weight": 0.25, "classifier.1.weight": 0.01})
    assert r["features.0"] == 0.0 and r["features.3"] == pytest.approx(0.5) and r["classifier.1"] == pytest.approx(0.9)


def test_global_channel_allocation_differs_per_layer_and_verifies():
    torch.manual_seed(0)
    model = randomize_norms(SmallResNet(10, 8))
    x = torch.randn(2, 1, 28, 28)
    rep = prune_channels(model, x, 0.5, "magnitude", global_pruning=True)
    assert rep["verify_max_abs_diff"] < 1e-4
    kept = {m.out_channels / c for m, c in ((model.stem[0], 8), (model.layers[1].conv1, 16), (model.layers[2].conv1, 32))}
    assert len(kept) > 1  # not the same ratio everywhere


def test_count_macs_counts_same_padding_convs():
    from prunekit.vision.channels import count_macs

    m = EfficientNetLite0(1000)
    macs = count_macs(m, torch.randn(1, 3, 224, 224))
    assert 380e6 < macs < 420e6  # EfficientNet-Lite0 is ~0.4 GMACs at 224x224
    n = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    assert count_macs(n, torch.randn(1, 2, 6, 6)) == 4 * 4 * 4 * 1 * 9 + 3 * 64


def test_precropping_and_scratch_runs_shrink_the_model():
    from prunekit.vision.train import load_data, make_config, train_prune

    data = load_data("synthetic", 128, 64)
    cfg = make_config(model="resnet", dataset="synthetic", structure="channels", method="snip", allocation="global",
                      schedule="at-init", sparsity=0.8, epochs=1, finetune_epochs=0, batch_size=64)
    torch.manual_seed(0)
    model, masks, info = train_prune(cfg, progress=False, data=data)
    assert masks is None and info["channels"]["params_after"] < info["channels"]["params_before"]
    assert len(set(round(v, 3) for v in info["precrop_ratios"].values())) > 1  # per-layer, not uniform
    assert sum(p.numel() for p in model.parameters()) == info["channels"]["params_after"]
    cfg2 = cfg.model_copy(update={"schedule": "scratch", "criterion": "magnitude"})
    model2, _, info2 = train_prune(cfg2, progress=False, data=data)
    assert info2["channels"]["params_after"] < info2["channels"]["params_before"]
