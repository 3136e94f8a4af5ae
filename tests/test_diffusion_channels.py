"""Diffusion channel pruning into stock UNets, and APTP's routed experts.

"Channel removal equals zeroing those channels": the pruned stock UNet gives the outputs of the dense UNet whose
removed channels are zeroed (producers' rows and biases) and whose GroupNorms / LayerNorms normalise over the
kept channels only. APTP: every condition goes to exactly one expert, each expert is a stock UNet that reloads,
and a save/load round trip keeps the routing and the samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.diffusion import aptp, methods, pipeline
from prunekit.diffusion import channels as ch
from prunekit.diffusion.pipeline import Pipeline, Prompts
from prunekit.errors import PruneError

torch.set_num_threads(1)

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon",
         "clip_sample": True, "set_alpha_to_one": False}


def jitter(net: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Non-trivial norm affines and biases (fresh ones are 1 and 0), so a wrongly kept channel shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def tiny_cond_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return jitter(UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4), seed)


def tiny_class_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return jitter(UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, num_class_embeds=4), seed)


def tiny_pipe(seed: int = 0) -> Pipeline:
    from transformers import CLIPTextConfig, CLIPTextModel

    prompts = Prompts.for_classes(["shirt", "shoe", "bag", "coat"])
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(prompts.words) + 3, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=prompts.length, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2)).eval()
    return Pipeline(tiny_cond_unet(seed), dict(SCHED), text, None, prompts)


def tiny_ctx(pipe: Pipeline, n: int = 48) -> methods.Context:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1)
    calib = pipe.condition(torch.arange(8) % 4, guidance=False)
    return methods.Context(dense=pipe, calib=calib, noise=torch.randn(8, 1, 8, 8, generator=g), calib_steps=2,
                           images=images, labels=labels, progress=False)


class MaskedNorm(nn.Module):
    """A dense GroupNorm / LayerNorm whose statistics come from the kept channels only (grouped as the pruned
    model groups them); the removed channels come out zero."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor):
        super().__init__()
        self.norm, self.keep = norm, keep

    def forward(self, x):
        m, k = self.norm, self.keep
        out = torch.zeros_like(x)
        if isinstance(m, nn.GroupNorm):
            out[:, k] = F.group_norm(x[:, k], m.num_groups, m.weight[k], m.bias[k], m.eps)
        else:
            out[..., k] = F.layer_norm(x[..., k], (len(k),), m.weight[k], m.bias[k], m.eps)
        return out


def zeroed(unet: nn.Module, plan: ch.Plan) -> nn.Module:
    """The dense UNet with every removed output channel zeroed and its norms masked."""
    z = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (rows, _) in plan.lin.items():
            if rows is None:
                continue
            m = z.get_submodule(name)
            gone = torch.ones(m.weight.shape[0], dtype=torch.bool)
            gone[rows] = False
            m.weight[gone] = 0
            if m.bias is not None:
                m.bias[gone] = 0
    for name, keep in plan.norm.items():
        parent, _, attr = name.rpartition(".")
        owner = z.get_submodule(parent)
        setattr(owner, attr, MaskedNorm(getattr(owner, attr), keep))
    return z.eval()


def cond_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 400, 900]),
            {"encoder_hidden_states": torch.randn(3, 5, 16, generator=g)})


def test_channel_removal_equals_zeroing_those_channels():
    unet = tiny_cond_unet()
    scores = ch.importances(unet)
    keep = ch.keep_for(unet, [8, 12], scores["levels"])  # level 0 whole, level 1 16 -> 12
    new, plan = ch.shrink(unet, keep, scores=scores, return_plan=True)
    assert type(new).__name__ == "UNet2DConditionModel" and list(new.config.block_out_channels) == [8, 12]
    assert plan.qscale, "the attention heads lost dimensions, so the queries are rescaled"
    # 3 of 4 channels from each of the 4 dense GroupNorm groups
    assert torch.equal(torch.bincount(keep[1] // 4, minlength=4), torch.full((4,), 3))
    x, t, kw = cond_inputs()
    with torch.no_grad():
        a = new(x, t, **kw).sample
        b = zeroed(unet, plan)(x, t, **kw).sample
        dense = unet(x, t, **kw).sample
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert float((a - dense).abs().max()) > 1e-3  # pruning did change the model


def test_channels_method_reaches_ratio_and_saves_stock(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipe()
    ctx = tiny_ctx(pipe)
    recipe = methods.DiffusionRecipe(method="channels", ratio=0.2)
    out, rows = methods.run(pipe, recipe, ctx)
    assert rows["macs"] <= 0.8 * rows["macs_dense"]
    assert rows["macs"] == pipeline.count_macs(out)
    assert rows["widths"][0] == 8 and rows["widths"] != [8, 16]
    pipeline.save(out, tmp_path / "p", {"recipe": recipe.model_dump()})
    stock = UNet2DConditionModel.from_pretrained(tmp_path / "p" / "unet", use_safetensors=True).eval()
    again = pipeline.load(tmp_path / "p")
    x, t, kw = cond_inputs()
    with torch.no_grad():
        y = out.unet(x, t, **kw).sample
        assert torch.equal(y, stock(x, t, **kw).sample)
        assert torch.equal(y, again.unet(x, t, **kw).sample)
    assert pipe.unet.config.block_out_channels == (8, 16) or list(pipe.unet.config.block_out_channels) == [8, 16]


def test_taylor_criterion_and_explicit_widths():
    pipe = tiny_pipe()
    ctx = tiny_ctx(pipe)
    recipe = methods.DiffusionRecipe(method="channels", options={"criterion": "taylor", "widths": [8, 4],
                                                                 "taylor_batches": 1, "batch_size": 4})
    out, rows = methods.run(pipe, recipe, ctx)
    assert rows["widths"] == [8, 4] and list(out.unet.config.block_out_channels) == [8, 4]


def test_bad_ratio_and_widths_are_one_sentence():
    pipe = tiny_pipe()
    ctx = tiny_ctx(pipe)
    for ratio in (0.0, 1.0, 1.5, None):
        with pytest.raises(PruneError, match="ratio"):
            methods.run(pipe, methods.DiffusionRecipe(method="channels", ratio=ratio), ctx)
    with pytest.raises(PruneError, match="norm_num_groups"):
        methods.run(pipe, methods.DiffusionRecipe(method="channels", options={"widths": [8, 10]}), ctx)
    with pytest.raises(PruneError, match="different widths"):
        ch.check_widths(pipe.unet, [8, 8])
    with pytest.raises(PruneError, match="out of reach"):
        methods.run(pipe, methods.DiffusionRecipe(method="channels", ratio=0.95), ctx)
    with pytest.raises(PruneError, match="multiple of 8"):
        from diffusers import UNet2DConditionModel

        heads = UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
            norm_num_groups=4)
        ch.check_widths(heads, [8, 12])  # 12 channels cannot split over 8 heads


def test_unet2dmodel_shrink_equals_zeroing_and_reloads(tmp_path):
    from diffusers import UNet2DModel

    unet = tiny_class_unet()
    scores = ch.importances(unet)
    new, plan = ch.shrink(unet, ch.keep_for(unet, [8, 12], scores["levels"]), scores=scores, return_plan=True)
    assert type(new).__name__ == "UNet2DModel" and list(new.config.block_out_channels) == [8, 12]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([5, 400, 900]), torch.tensor([0, 3, 1])
    new.save_pretrained(tmp_path / "u", safe_serialization=True)
    back = UNet2DModel.from_pretrained(tmp_path / "u", use_safetensors=True).eval()
    with torch.no_grad():
        a = new(x, t, class_labels=y).sample
        assert torch.allclose(a, zeroed(unet, plan)(x, t, class_labels=y).sample, atol=1e-5)
        assert torch.equal(a, back(x, t, class_labels=y).sample)


def test_level_zero_shrinks_with_refit_time_embedding():
    unet = tiny_cond_unet()
    new, plan = ch.shrink(unet, ch.keep_for(unet, [4, 12], ch.level_importance(unet)), return_plan=True)
    assert list(new.config.block_out_channels) == [4, 12]
    assert new.config.time_embedding_dim == unet.time_embedding.linear_2.out_features
    assert plan.time_refit_error is not None and plan.time_refit_error >= 0


def test_mac_model_is_exact():
    pipe = tiny_pipe()
    model = ch.MacModel(pipe, levels=[0, 1])
    for w in ([8, 12], [4, 12], [8, 4], [8, 16]):
        assert abs(float(model.macs(w)) - model.count(w)) < 1e-3 * model.dense_macs


# -- APTP -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aptp_run(tmp_path_factory):
    pipe = tiny_pipe()
    ctx = tiny_ctx(pipe)
    recipe = methods.DiffusionRecipe(method="aptp", ratio=0.4,
                                     options={"experts": 2, "steps": 12, "batch_size": 8, "lr": 0.2})
    out, rows = methods.run(pipe, recipe, ctx)
    path = pipeline.save(out, tmp_path_factory.mktemp("aptp") / "p", {"recipe": recipe.model_dump()})
    return pipe, out, rows, path


def test_aptp_router_assigns_every_condition_to_one_architecture(aptp_run):
    from diffusers import UNet2DConditionModel

    _, out, rows, path = aptp_run
    labels = torch.arange(4)
    r = aptp.route(out, labels)
    assert r.shape == (4,) and r.dtype == torch.long
    assert bool(((r >= 0) & (r < 2)).all())
    st = out.extras["aptp"]
    assert len(st["experts"]) == 2 and len(rows["experts"]) == 2
    for k, net in enumerate(st["experts"]):
        assert type(net).__name__ == "UNet2DConditionModel"
        back = UNet2DConditionModel.from_pretrained(path / "experts" / str(k), use_safetensors=True)
        assert list(back.config.block_out_channels) == st["codes"][k]["widths"]
    assert abs(sum(e["share"] for e in rows["experts"]) - 1) < 1e-6
    assert rows["macs"] < rows["macs_dense"]
    assert out.unet is st["experts"][max(range(2), key=lambda k: rows["experts"][k]["macs"])]


def test_aptp_round_trip_keeps_routing_and_samples(aptp_run):
    _, out, _, path = aptp_run
    back = pipeline.load(path)
    cond = out.condition(torch.tensor([0, 1, 2, 3, 1]), guidance=False)
    assert torch.equal(aptp.route(out, cond), aptp.route(back, back.condition(torch.tensor([0, 1, 2, 3, 1]),
                                                                                 guidance=False)))
    a = aptp.sample_routed(out, cond, steps=2, seed=3)
    b = aptp.sample_routed(back, cond, steps=2, seed=3)
    assert torch.allclose(a, b, atol=1e-6)
    # the same noise per sample index as pipeline.sample: one condition sampled alone by its expert agrees
    k = int(aptp.route(out, cond)[0])
    alone = pipeline.sample(out, cond, steps=2, seed=3, unet=out.extras["aptp"]["experts"][k])
    assert torch.allclose(a[0], alone[0], atol=1e-5)


def test_aptp_training_pulls_expected_macs_to_target(aptp_run):
    _, _, rows, _ = aptp_run
    target = rows["target"]
    # the budget is the average under the (balanced) routing, and the experts start apart
    first, last = rows["expected_macs_first"], rows["expected_macs_last"]
    assert first[0] > first[-1]
    assert abs(sum(last) / len(last) - target) < abs(sum(first) / len(first) - target)


def test_aptp_sinkhorn_balances():
    logits = torch.tensor([[5.0, 0.0]] * 8)  # every row prefers expert 0
    q = aptp.sinkhorn(logits, eps=0.5)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((2,), 4.0), atol=1e-3)
