"""ToMe for Stable Diffusion in a diffusers UNet (prunekit.diffusion.tome): exactness where nothing merges, the
restored UNet, the measured MACs, closeness to the dense output, the method's rows and settings, and agreement
with the authors' tomesd package where it is installed."""

from __future__ import annotations

import sys
import types

import pytest
import torch

pytest.importorskip("diffusers")

from prunekit.diffusion import tome
from prunekit.diffusion.methods import METHODS, DiffusionRecipe
from prunekit.diffusion.pipeline import Pipeline, count_macs
from prunekit.errors import PruneError

torch.set_num_threads(1)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 7, 32, generator=g)


@pytest.fixture(scope="module")
def dense(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def call(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_ratio_zero_is_bit_identical(unet, inputs, dense):
    with tome.apply(unet, 0.0, merge_crossattn=True, merge_mlp=True, max_downsample=8) as h:
        assert torch.equal(call(unet, inputs), dense)
        assert all(a == b for a, b in h.tokens)


def test_remove_restores_the_unet_exactly(unet, inputs, dense):
    blocks = tome.transformer_blocks(unet)
    h = tome.apply(unet, 0.5, max_downsample=2)
    tome.apply(unet, 0.3)  # re-applying replaces the first patch
    assert not h.active
    merged = call(unet, inputs)
    assert not torch.equal(merged, dense)
    tome.handle_of(unet).remove()
    assert torch.equal(call(unet, inputs), dense)
    assert tome.handle_of(unet) is None and not unet._forward_pre_hooks
    assert all("forward" not in b.__dict__ for b in blocks)


def test_block_reimplementation_is_the_stock_forward(unet):
    block = tome.transformer_blocks(unet)[0]
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 256, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        stock = block(x, encoder_hidden_states=ctx)
        ours = tome.merged_block(block, x, None, tome.TomeOptions(), encoder_hidden_states=ctx)
    assert torch.equal(ours, stock)


def test_merging_cuts_attention_macs_and_stays_close(unet, inputs, dense):
    pipe = Pipeline(unet, {"num_train_timesteps": 1000})
    macs_dense = count_macs(pipe)
    attn = []

    def hook(m, args, kwargs, out):
        attn.append(args[0].shape[1])

    hooks = [b.attn1.register_forward_hook(hook, with_kwargs=True) for b in tome.transformer_blocks(unet)]
    try:
        with tome.apply(unet, 0.1, use_rand=False) as h:
            macs = count_macs(pipe)
            seen = list(attn)
            close = call(unet, inputs)
            assert [n for n, _ in h.tokens] == [256, 64, 256, 256]  # 16x16 blocks, the 8x8 mid block
            assert [k for _, k in h.tokens] == [231, 64, 231, 231]  # max_downsample 1: only the 16x16 blocks
    finally:
        for k in hooks:
            k.remove()
    assert seen == [231, 64, 231, 231]  # the UNet's own attention modules ran on the merged tokens
    assert macs < macs_dense
    assert rel(close, dense) < 0.03


def test_destinations_one_per_cell():
    a, b = tome.destinations(5, 7, 2, 2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([a, b]).tolist()) == list(range(35))
    assert len(b) == 2 * 3  # full 2x2 cells only
    cells = sorted((int(i) // 7 // 2, int(i) % 7 // 2) for i in b)
    assert cells == [(r, c) for r in range(2) for c in range(3)]
    assert tome.destinations(4, 4, 2, 2)[1].tolist() == [0, 2, 8, 10]
    assert tome.destinations(1, 4, 2, 2) is None


def test_random_destinations_reproducible_per_timestep(unet, inputs):
    x, _, e = inputs
    with tome.apply(unet, 0.5, use_rand=True, seed=3):
        first = call(unet, inputs)
        call(unet, (x, torch.tensor([10, 10]), e))  # another step in between changes nothing
        assert torch.equal(call(unet, inputs), first)


def test_method_rows_settings_and_reapply(inputs):
    pipe = Pipeline(tiny_unet(), {"num_train_timesteps": 1000})
    recipe = DiffusionRecipe(method="tome", ratio=0.4, seed=5, options={"merge_mlp": True})
    entry = METHODS.get("tome")
    opts = METHODS.options("tome", recipe.options)
    rows = entry.impl(pipe, recipe, opts, types.SimpleNamespace(log=lambda s: None))
    assert rows["macs"] < rows["macs_dense"] and rows["merging_blocks"] == 3
    s = pipe.extras["tome"]
    assert s == {"ratio": 0.4, "seed": 5, "max_downsample": 1, "sx": 2, "sy": 2, "use_rand": True,
                 "merge_attn": True, "merge_crossattn": False, "merge_mlp": True}
    merged = call(pipe.unet, inputs)
    again = Pipeline(tiny_unet(), {}, extras={"tome": dict(s)})
    h = tome.reapply(again)
    assert h is not None and torch.equal(call(again.unet, inputs), merged)
    assert tome.reapply(Pipeline(tiny_unet(), {})) is None


@pytest.mark.parametrize("ratio", [None, 0.0, 1.0, 1.5])
def test_bad_ratio_is_one_sentence(ratio):
    pipe = Pipeline(tiny_unet(), {})
    with pytest.raises(PruneError):
        tome.run(pipe, DiffusionRecipe(method="tome", ratio=ratio), tome.TomeOptions(), None)
    assert tome.handle_of(pipe.unet) is None


def test_bad_settings(unet):
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"ratio": 0.5, "sx": 0}, {"ratio": 0.5, "max_downsample": 0}):
        with pytest.raises(PruneError):
            tome.apply(unet, **bad)
    with pytest.raises(PruneError, match="BasicTransformerBlock"):
        tome.apply(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(PruneError):
        METHODS.options("tome", {"sx": 0})


def test_tomesd_peer_absent(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomesd", None)
    with pytest.raises(PruneError, match="pip install tomesd"):
        tome.tomesd_peer(unet, 0.5)


def test_agrees_with_tomesd(unet, inputs, dense):
    pytest.importorskip("tomesd")
    for kw in ({}, {"merge_crossattn": True, "merge_mlp": True, "max_downsample": 2}):
        with tome.apply(unet, 0.5, use_rand=False, **kw):
            ours = call(unet, inputs)
        theirs = call(tome.tomesd_peer(unet, 0.5, use_rand=False, **kw), inputs)
        assert (ours - theirs).abs().max() < 1e-4
        assert rel(ours, dense) > 1e-3  # both really merged
    assert torch.equal(call(unet, inputs), dense)  # the peer patched a copy


def test_tome_that_merges_nowhere_is_one_sentence():
    """A UNet whose attention starts below max_downsample: the method refuses instead of a silent no-op."""
    from prunekit.diffusion import tome
    from prunekit.diffusion.methods import DiffusionRecipe
    from prunekit.errors import PruneError
    from tests.test_diffusion import context, tiny_pipe

    pipe = tiny_pipe()  # attention only at the second level (downsample 2)
    rec = DiffusionRecipe(method="tome", ratio=0.5, calib_samples=4, calib_steps=2)
    with pytest.raises(PruneError, match="max_downsample"):
        tome.run(pipe, rec, tome.TomeOptions(), context(pipe, rec))
    assert tome.handle_of(pipe.unet) is None and "tome" not in pipe.extras
    rows = tome.run(pipe, rec, tome.TomeOptions(max_downsample=2), context(pipe, rec))
    assert rows["merging_blocks"] > 0 and rows["macs"] < rows["macs_dense"]
