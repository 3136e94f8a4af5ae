"""The diffusion family: pipelines, magnitude / N:M per component, BK-SDM block removal, LD-Pruner, the CLI.

Tiny random models from configs (as diffusers' own tests): a UNet2DConditionModel with two levels of two pairs,
a 2-layer CLIPTextModel reading prunekit's word prompts, and for the Stable Diffusion code path an AutoencoderKL.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import error_line, invoke

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Diffusion tests run tiny models: one torch thread."""


def tiny_unet(seed=0, layers=2, latent=1, size=8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=size, in_channels=latent, out_channels=latent, layers_per_block=layers,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4).eval()


def tiny_pipe(vae=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    from prunekit.diffusion.pipeline import Pipeline, Prompts

    prompts = Prompts.for_classes([f"class{i}" for i in range(10)])
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(prompts.words) + 3, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=prompts.length, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2)).eval()
    v = None
    if vae:
        from diffusers import AutoencoderKL

        torch.manual_seed(seed + 2)
        v = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                          norm_num_groups=4, sample_size=16).eval()
    sched = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
    return Pipeline(tiny_unet(seed, latent=4 if vae else 1), sched, text, v, prompts,
                    {"classes": 10, "source": "test"})


def context(pipe, recipe, n=64):
    from prunekit.diffusion.methods import build_context

    g = torch.Generator().manual_seed(0)
    x = torch.rand((n, *pipe.in_shape()), generator=g) * 2 - 1
    return build_context(pipe, recipe, images=x, labels=torch.arange(n) % 10, progress=False)


def recipe(**kw):
    from prunekit.diffusion import DiffusionRecipe

    kw.setdefault("calib_samples", 8)
    kw.setdefault("calib_steps", 3)
    return DiffusionRecipe.make(**kw)


def out_of(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *[unet.config.in_channels, unet.config.sample_size, unet.config.sample_size]), generator=g)
    h = torch.randn((2, 5, 16), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), encoder_hidden_states=h).sample


# -- pipelines --------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_stock_parts(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from prunekit.diffusion import load, save

    pipe = tiny_pipe(vae=True)
    save(pipe, tmp_path / "p", {"kind": "diffusion"} | {"schema": 1})
    back = load(tmp_path / "p")
    assert torch.equal(out_of(back.unet), out_of(pipe.unet))
    assert back.prompts.prompts == pipe.prompts.prompts
    # every part loads with stock classes alone
    u = UNet2DConditionModel.from_pretrained(tmp_path / "p", subfolder="unet")
    assert torch.equal(out_of(u), out_of(pipe.unet))
    CLIPTextModel.from_pretrained(tmp_path / "p" / "text_encoder")


def test_sample_is_deterministic_and_decodes_through_the_vae():
    from prunekit.diffusion import sample

    pipe = tiny_pipe(vae=True)
    cond = pipe.condition(torch.arange(4), guidance=True)
    a = sample(pipe, cond, steps=3, guidance=2.0, seed=1)
    b = sample(pipe, cond, steps=3, guidance=2.0, seed=1)
    assert a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    # the noise of sample i depends on the seed and i only: a batch split gives the same images
    c = sample(pipe, cond, steps=3, guidance=2.0, seed=1, batch=3)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    lat = sample(pipe, cond, steps=3, guidance=2.0, seed=1, decode=False)
    assert lat.shape == (4, 4, 8, 8)


# -- BK-SDM block removal ---------------------------------------------------------------------------------

def test_removing_nothing_is_bit_identical():
    from prunekit.diffusion.blocks import apply_ops

    u = tiny_unet()
    assert torch.equal(out_of(apply_ops(u, [])), out_of(u))


@pytest.mark.parametrize("ops", [["mid"], ["mid.attention"], ["down.1.attention"], ["up.0.attention"],
                                 ["level.0.pair"], ["level.1.pair", "mid", "up.0.attention"]])
def test_removed_blocks_reload_with_stock_diffusers(tmp_path, ops):
    from diffusers import UNet2DConditionModel

    from prunekit.diffusion.blocks import apply_ops

    u = tiny_unet()
    small = apply_ops(u, ops)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in u.parameters())
    small.save_pretrained(tmp_path / "u")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    assert torch.equal(out_of(back), out_of(small))
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    if "mid" in ops:
        assert cfg["mid_block_type"] is None


def test_removal_never_changes_a_loaded_unets_config(tmp_path):
    """A config read from disk holds lists; editing a shallow copy once changed the input UNet's block types."""
    from diffusers import UNet2DConditionModel

    from prunekit.diffusion.blocks import apply_ops, candidates

    tiny_unet().save_pretrained(tmp_path / "u")
    u = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    before = json.dumps(dict(u.config), default=str, sort_keys=True)
    for op in candidates(u):
        apply_ops(u, [op])
    assert json.dumps(dict(u.config), default=str, sort_keys=True) == before
    apply_ops(u, ["down.1.attention"])  # again: the input still has its attention


def test_a_removed_pair_reuses_the_kept_weights():
    from prunekit.diffusion.blocks import apply_ops

    u = tiny_unet()
    small = apply_ops(u, ["level.1.pair"])
    assert len(small.down_blocks[1].resnets) == 1 and len(small.up_blocks[0].resnets) == 2
    torch.testing.assert_close(small.down_blocks[1].resnets[0].conv1.weight, u.down_blocks[1].resnets[0].conv1.weight)
    # the up block kept its first and last pair (the second-to-last went)
    torch.testing.assert_close(small.up_blocks[0].resnets[1].conv1.weight, u.up_blocks[0].resnets[2].conv1.weight)
    torch.testing.assert_close(small.up_blocks[0].attentions[1].proj_in.weight, u.up_blocks[0].attentions[2].proj_in.weight)


def test_bad_operators_are_one_sentence():
    from prunekit.diffusion.blocks import apply_ops
    from prunekit.errors import PruneError

    u = tiny_unet(layers=1)
    with pytest.raises(PruneError, match="keep no resnet"):
        apply_ops(u, ["level.0.pair"])
    with pytest.raises(PruneError, match="Unknown operator"):
        apply_ops(u, ["mid.block"])
    with pytest.raises(PruneError, match="not in this UNet"):
        apply_ops(u, ["down.0.attention"])


def test_bk_sdm_presets_and_ratio():
    from prunekit.diffusion import prune

    pipe = tiny_pipe()
    small, rows = prune(pipe, recipe(method="bk-sdm", options={"preset": "small"}), context=context(pipe, recipe(method="bk-sdm")))
    assert rows["ops"] == ["level.0.pair", "level.1.pair", "mid"]
    assert small.unet.mid_block is None and pipe.unet.mid_block is not None  # the input is never changed
    _, rows = prune(pipe, recipe(method="bk-sdm", ratio=0.3), context=context(pipe, recipe(method="bk-sdm")))
    assert rows["unet_macs"] <= 0.7 * rows["unet_macs_dense"]


# -- LD-Pruner --------------------------------------------------------------------------------------------

def test_ld_pruner_identity_scores_zero_and_order():
    from prunekit.diffusion.blocks import apply_ops
    from prunekit.diffusion.ldpruner import latent_score, scores

    pipe = tiny_pipe()
    ctx = context(pipe, recipe(method="ld-pruner", ratio=0.2))
    ref = ctx.latents(pipe)
    assert latent_score(ref, ctx.latents(pipe, unet=apply_ops(pipe.unet, []))) == 0.0
    sc = scores(pipe, ctx, ["mid", "up.0.attention"], progress=False)
    assert all(v > 0 for v in sc.values())
    # the score is the paper's: |mean shift| + |std shift| over the samples
    shifted = ref + 0.5
    assert latent_score(ref, shifted) == pytest.approx(0.5 * ref[0].numel() ** 0.5, rel=1e-5)


def test_ld_pruner_removes_the_lowest_scores_until_the_ratio():
    from prunekit.diffusion import prune

    pipe = tiny_pipe()
    rec = recipe(method="ld-pruner", ratio=0.25)
    _small, rows = prune(pipe, rec, context=context(pipe, rec))
    order = rows["order"]
    assert order == sorted(rows["scores"], key=lambda o: rows["scores"][o]) or len(set(rows["scores"].values())) < len(order)
    # the lowest scores first, until the MACs fall by the ratio; the later of mid / mid.attention is skipped
    # (the whole mid block and its attention exclude each other)
    upto = order[:order.index(rows["ops"][-1]) + 1]
    mids = [o for o in upto if o.startswith("mid")]
    assert rows["ops"] == [o for o in upto if not o.startswith("mid") or o == mids[0]]
    assert rows["unet_macs"] <= 0.75 * rows["unet_macs_dense"]
    _rnd, rrows = prune(pipe, recipe(method="ld-pruner", ratio=0.25, options={"order": "random"}),
                       context=context(pipe, rec))
    assert rrows["scores"] == {} and rrows["unet_macs"] <= 0.75 * rrows["unet_macs_dense"]


# -- magnitude / N:M per component ------------------------------------------------------------------------

def test_magnitude_per_component_sparsity_and_finetune_keeps_masks():
    from prunekit.core.masks import prunable
    from prunekit.diffusion import prune

    pipe = tiny_pipe()
    rec = recipe(method="magnitude", ratio=0.5, options={"text_sparsity": 0.3}, finetune={"steps": 3, "batch_size": 4})
    small, rows = prune(pipe, rec, context=context(pipe, rec))
    names = list(prunable(small.unet, ["conv_in", "conv_out"]))
    z = sum(int((dict(small.unet.named_parameters())[n] == 0).sum()) for n in names)
    tot = sum(dict(small.unet.named_parameters())[n].numel() for n in names)
    assert abs(z / tot - 0.5) < 0.01  # exact per layer up to rounding; kept through the fine-tune
    assert rows["finetune"]["steps"] == 3
    assert rows["text_encoder"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert torch.count_nonzero(small.unet.conv_in.weight) == pipe.unet.conv_in.weight.numel()


def test_n_m_and_wanda():
    from prunekit.diffusion import prune

    pipe = tiny_pipe()
    rec = recipe(method="magnitude", options={"nm": "2:4", "criterion": "wanda"})
    small, _rows = prune(pipe, rec, context=context(pipe, rec))
    w = small.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert (groups <= 2).all() and (groups == 2).float().mean() > 0.9
    w0 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    mag, _ = prune(pipe, recipe(method="magnitude", options={"nm": "2:4"}), context=context(pipe, rec))
    wm = mag.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(wm != 0, w != 0)  # Wanda's activation norms change the choice
    assert torch.equal(w0 != 0, torch.ones_like(w0, dtype=torch.bool))


# -- evaluation -------------------------------------------------------------------------------------------

def test_frechet_distance():
    from prunekit.diffusion.evaluate import frechet

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4))
    assert frechet(a, b) < 0.05
    assert frechet(a, b + 2.0) == pytest.approx(16.0, rel=0.05)


def test_count_macs_sees_attention_and_removed_blocks():
    from prunekit.diffusion.blocks import apply_ops
    from prunekit.diffusion.pipeline import count_macs

    pipe = tiny_pipe()
    dense = count_macs(pipe)
    assert count_macs(pipe, apply_ops(pipe.unet, ["up.0.attention"])) < dense


# -- CLI --------------------------------------------------------------------------------------------------

def test_cli_prune_writes_a_stock_pipeline(tmp_path):
    from diffusers import UNet2DConditionModel

    from prunekit.diffusion import save

    save(tiny_pipe(), tmp_path / "p", {"schema": 1, "kind": "diffusion", "source": "test", "classes": 10})
    rc, _out, err = invoke("diffusion", "prune", tmp_path / "p", "--method", "bk-sdm", "--options",
                          '{"preset": "small"}', "--out", tmp_path / "s", "--quiet")
    assert rc == 0, err
    rec = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    assert rec["kind"] == "diffusion" and rec["recipe"]["method"] == "bk-sdm"
    u = UNet2DConditionModel.from_pretrained(tmp_path / "s", subfolder="unet")
    assert u.mid_block is None


def test_cli_bad_input_is_one_sentence_and_writes_nothing(tmp_path):
    from prunekit.diffusion import save

    (tmp_path / "empty").mkdir()
    rc, _, err = invoke("diffusion", "prune", tmp_path / "empty", "--method", "ld-pruner", "--ratio", "0.3",
                        "--out", tmp_path / "o")
    assert rc == 2 and "no unet/" in error_line(err) and not (tmp_path / "o").exists()
    save(tiny_pipe(), tmp_path / "p", {"schema": 1, "kind": "diffusion"})
    for args, words in ((["--method", "ld-pruner", "--ratio", "1.5"], "(0, 1)"),
                        (["--method", "ld-pruner", "--ratio", "0"], "(0, 1)"),
                        (["--method", "prunr", "--ratio", "0.3"], "choose one of"),
                        (["--method", "magnitude", "--options", "{bad"], "JSON"),
                        (["--method", "bk-sdm", "--options", '{"ops": ["mid.block"]}'], "Unknown operator")):
        rc, _, err = invoke("diffusion", "prune", tmp_path / "p", *args, "--out", tmp_path / "o")
        assert rc == 2 and words in error_line(err), (args, err)
        assert not (tmp_path / "o").exists()
    (tmp_path / "r.json").write_text('{"method": "channels", "ratio": 0.3, "finetune": {"steps": 2, "ema": 1.0}}')
    rc, _, err = invoke("diffusion", "prune", tmp_path / "p", "--recipe", tmp_path / "r.json", "--out", tmp_path / "o")
    assert rc == 2 and "finetune.ema" in error_line(err) and not (tmp_path / "o").exists()
    rc, _, err = invoke("diffusion", "eval", tmp_path / "p", "--samples", "5")
    assert rc == 2 and "--samples" in error_line(err)


@pytest.mark.slow
def test_cli_end_to_end_on_fashion_mnist(tmp_path):
    """train-reference (a 20-step model: the real one trains 4,000), prune, eval: the commands a user runs, on the
    real Fashion-MNIST images and the real fidelity classifier (trained once, cached)."""
    from diffusers import UNet2DConditionModel

    rc, out, err = invoke("diffusion", "train-reference", "--steps", "20", "--out", tmp_path / "ref", "--quiet")
    assert rc == 0, err
    rc, out, err = invoke("diffusion", "prune", tmp_path / "ref", "--method", "ld-pruner", "--ratio", "0.1",
                          "--finetune-steps", "2", "--out", tmp_path / "small", "--quiet")
    assert rc == 0, err
    small = UNet2DConditionModel.from_pretrained(tmp_path / "small", subfolder="unet")
    dense = UNet2DConditionModel.from_pretrained(tmp_path / "ref", subfolder="unet")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())
    rc, _out, err = invoke("diffusion", "eval", tmp_path / "small", "--samples", "20", "--steps", "2",
                          "--out", tmp_path / "m.json", "--quiet")
    assert rc == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= m["class_fidelity"] <= 1.0 and m["fid"] > 0 and m["unet_macs"] > 0
    assert len(m["class_fidelity_per_class"]) == 10


def test_finetune_drops_a_share_of_conditions_for_guidance():
    from prunekit.diffusion.methods import drop_conditions

    pipe = tiny_pipe()
    with torch.no_grad():
        cond = pipe.condition(torch.arange(200) % 10, guidance=True)
    out = drop_conditions(cond, 0.25, torch.Generator().manual_seed(0))
    null = (out.hidden == cond.null_hidden).flatten(1).all(1)
    kept = (out.hidden == cond.hidden).flatten(1).all(1)
    assert bool((null | kept).all()) and 30 <= int(null.sum()) <= 70
    assert torch.equal(drop_conditions(cond, 0.0, torch.Generator()).hidden, cond.hidden)


def test_finetune_leaves_the_weight_average_when_asked():
    from prunekit.diffusion.methods import FinetuneConfig, finetune

    base = tiny_pipe()
    rec = recipe(method="magnitude", ratio=0.5)
    ctx = context(base, rec)
    got = {}
    for ema in (0.0, 0.9):
        pipe = base.clone()
        finetune(pipe, ctx, FinetuneConfig(steps=4, batch_size=4, lr=1e-2, ema=ema))
        got[ema] = pipe.unet.conv_in.weight.detach().clone()
    start = base.unet.conv_in.weight
    # the same seeded steps either way: only the average differs, and it lies between the start and the end
    assert not torch.equal(got[0.0], start) and not torch.allclose(got[0.9], got[0.0])
    assert (got[0.9] - start).norm() < (got[0.0] - start).norm()
