"""The calibration engine gives every block exactly the inputs the model's own forward gives it, on every family.

Each family in ``ENGINE_FAMILIES`` (conftest) is a tiny random config exercising one convention: sliding and
global layers with their own masks and rotary bases, soft-capping, scaled embeddings, tied heads, QK-norm,
parallel attention + MLP, fused QKV, multi-query attention, tuple-returning blocks, mixture-of-experts.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import ENGINE_FAMILIES, VOCAB, tiny_arch

import prunekit
from prunekit.arch import adapter_for, target_layers
from prunekit.calibrate import run_sequential
from prunekit.linear import weight_matrix

FAMS = list(ENGINE_FAMILIES)
SEQ, BATCH = 32, 2  # sequences longer than the sliding windows (8)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(5))


def _record_block_inputs(blocks):
    """Pre-hooks that record the hidden states each block is called with, in call order."""
    seen = {i: [] for i in range(len(blocks))}

    def hook(i):
        def fn(_m, args, kwargs):
            seen[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return fn

    return seen, [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]


@torch.no_grad()
def _own_inputs(model, blocks, ids):
    seen, handles = _record_block_inputs(blocks)
    try:
        for chunk in ids.split(BATCH):
            model(input_ids=chunk, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_every_family_has_its_own_adapter():
    for fam in FAMS:
        ad = adapter_for(tiny_arch(fam))
        assert not ad.family.startswith("generic"), fam


@pytest.mark.parametrize("mode", ["sequential", "one-pass"])
@pytest.mark.parametrize("family", FAMS)
def test_engine_inputs_equal_the_models_own(family, mode, ids):
    model = tiny_arch(family)
    blocks = adapter_for(model).blocks(model)
    own = _own_inputs(model, blocks, ids)
    seen, handles = _record_block_inputs(blocks)
    # the whole block as the "target": its pre-hook sees the engine's propagated input of that block
    targets = [[(f"block{i}", b)] for i, b in enumerate(blocks)]
    try:
        run_sequential(model, blocks, targets, ids, "sqnorm", lambda *a: None, batch_size=BATCH, progress=False,
                       propagate=mode == "sequential")
    finally:
        for h in handles:
            h.remove()
    chunks = len(own[0])
    for i in range(len(blocks)):
        assert len(seen[i]) >= chunks, (family, i)
        for a, b in zip(own[i], seen[i][:chunks]):  # the statistics pass: the first call per chunk
            assert a.shape == b.shape
            err = float((a - b).abs().max())
            assert err <= 1e-5, f"{family} ({mode}): block {i} input off by {err:.3g}"


@pytest.mark.parametrize("method,mode", [("wanda", "sequential"), ("sparsegpt", "sequential"), ("wanda", "one-pass")])
@pytest.mark.parametrize("family", FAMS)
def test_zero_sparsity_leaves_logits_unchanged(family, method, mode, ids):
    model = tiny_arch(family)
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    prunekit.prune(model, {"method": method, "sparsity": 0.0, "calibration": {"mode": mode, "batch_size": BATCH}},
                   ids, progress=False)
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    assert float((before - after).abs().max()) <= 1e-5, family


@pytest.mark.parametrize("family", FAMS)
def test_wanda_mask_is_the_rule_on_the_models_own_activations(family, ids):
    """One-pass Wanda: every target layer's mask follows |W| * ||x|| with x what the layer really reads in the dense
    model (fused projections, parallel blocks, QK-norm, MoE attention all included)."""
    dense, pruned = tiny_arch(family), tiny_arch(family)
    layers = [t for block in target_layers(dense, adapter_for(dense)) for t in block]
    sq = {n: torch.zeros(weight_matrix(m).shape[1]) for n, m in layers}

    def hook(name):
        def fn(_m, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            sq[name] += x.pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    with torch.no_grad():
        for chunk in ids.split(BATCH):
            dense(input_ids=chunk, use_cache=False)
    for h in handles:
        h.remove()
    prunekit.prune(pruned, {"method": "wanda", "sparsity": 0.5, "calibration": {"mode": "one-pass", "batch_size": BATCH}},
                   ids, progress=False)
    got_layers = dict(t for block in target_layers(pruned, adapter_for(pruned)) for t in block)
    for name, m in layers:
        w = weight_matrix(m)
        score = w.abs() * sq[name].sqrt()
        k = w.shape[1] // 2
        expected = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :k], True)
        got = weight_matrix(got_layers[name]) == 0
        assert torch.equal(got, expected), f"{family}: {name}"


def test_moe_expert_tensors_are_reported_dense(ids):
    model = tiny_arch("mixtral")
    _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids, progress=False)
    dense = rep.summary["kept_dense"]
    assert "model.layers.*.mlp.experts.gate_up_proj" in dense and "model.layers.*.mlp.experts.down_proj" in dense
    assert any("kept dense" in line for line in rep.lines())
    # the experts are untouched and the attention is pruned
    assert float((model.model.layers[0].mlp.experts.down_proj == 0).float().mean()) < 0.01
    assert abs(rep.summary["target_sparsity"] - 0.5) < 1e-6


def test_moe_with_router_outputs_requested(ids):
    """Router logits recorded by the model (output_router_logits) do not disturb the engine."""
    model = tiny_arch("mixtral")
    model.config.output_router_logits = True
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    prunekit.prune(model, {"method": "sparsegpt", "sparsity": 0.0}, ids, progress=False)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    assert out.router_logits is not None
    assert float((before - out.logits).abs().max()) <= 1e-5


@pytest.mark.parametrize("family", ["llama-tied", "gemma2", "falcon", "gpt_bigcode"])
def test_pruning_keeps_tied_embeddings_tied(family, ids, tmp_path):
    model = tiny_arch(family)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is emb.weight  # these configs tie
    before = emb.weight.detach().clone()
    prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids, progress=False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, before)  # embeddings are never a target
    prunekit.save(model, None, tmp_path / "out")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert loaded.config.tie_word_embeddings


def test_gemma2_soft_capping_is_in_the_evaluated_logits(ids):
    model = tiny_arch("gemma2")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert float(logits.abs().max()) <= model.config.final_logit_softcapping + 1e-5
    prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, ids, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert float(logits.abs().max()) <= model.config.final_logit_softcapping + 1e-5


def test_capture_does_not_fire_block_hooks(ids):
    """While the arguments are captured the blocks are stand-ins: hooks users put on blocks see only real calls."""
    model = tiny_arch("gemma3")
    blocks = adapter_for(model).blocks(model)
    calls = []
    h = blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        run_sequential(model, blocks, [[(f"b{i}", b)] for i, b in enumerate(blocks)], ids, "sqnorm",
                       lambda *a: None, batch_size=BATCH, progress=False, propagate=False)
    finally:
        h.remove()
    assert len(calls) == len(ids.split(BATCH))  # one real pass per chunk, none during the capture
    assert all(type(b).__name__ != "_Recorder" for b in blocks)  # the blocks are back


@pytest.mark.parametrize("family", ["gemma3", "qwen3", "mixtral", "falcon", "phi3"])
def test_structured_pruning_refuses_families_without_a_layout(family, ids):
    from prunekit.errors import PruneError

    with pytest.raises(PruneError, match="structured pruning is not available"):
        prunekit.prune(tiny_arch(family), {"structure": {"remove_layers": 1}}, ids, progress=False)
