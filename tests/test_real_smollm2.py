"""Real-model checks on the bundled SmolLM2-135M (slow: run by `make test` and CI)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.batches import calibration_batches, evaluation_windows, tokenize
from prunekit.zoo.text import shakespeare_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tok = prunekit.load_model("smollm2-135m")
    cal = calibration_batches(tokenize(tok, prunekit.load_text("shakespeare", "calibration")), 16, 128)
    ev = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), 256, 8)
    return model, tok, cal, ev


def test_split_is_disjoint():
    cal = {p.name for p in shakespeare_split("calibration")}
    ev = {p.name for p in shakespeare_split("evaluation")}
    assert len(ev) == 5 and len(cal) > 25 and not cal & ev
    assert not any(n.endswith("_f.txt") for n in cal | ev)


def test_smollm2_wanda_sparsegpt_real(smol, tmp_path):
    model, tok, cal, ev = smol
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = prunekit.evaluate(model, ev)["perplexity"]
    assert 20 < dense < 120, dense  # SmolLM2-135M on held-out plays is ~50

    _, rep = prunekit.prune(model, {"method": "wanda", "sparsity": 0.5}, cal, progress=False)
    assert rep.summary["target_sparsity"] == pytest.approx(0.5, abs=1e-3)
    wanda = prunekit.evaluate(model, ev)["perplexity"]
    assert dense < wanda < 4 * dense, (dense, wanda)

    out = prunekit.save(model, tok, tmp_path / "w50", {"recipe": rep.recipe})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ev[:1]).logits, reloaded(input_ids=ev[:1]).logits)

    model.load_state_dict(dense_state)
    magnitude_model = model
    prunekit.prune(magnitude_model, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    magnitude = prunekit.evaluate(magnitude_model, ev)["perplexity"]

    model.load_state_dict(dense_state)
    prunekit.prune(model, {"method": "sparsegpt", "pattern": "2:4"}, cal, progress=False)
    q = model.model.layers[5].self_attn.q_proj.weight
    assert ((q == 0).view(q.shape[0], -1, 4).sum(-1) >= 2).all()
    sgpt24 = prunekit.evaluate(model, ev)["perplexity"]
    # the literature's ordering at 50%: data-aware methods far ahead of magnitude
    assert wanda < magnitude and sgpt24 < magnitude, (wanda, sgpt24, magnitude)


def test_smollm2_windows_have_no_bos(smol):
    """SmolLM2's tokenizer adds no begin-of-sequence token (its bos is the chat marker), so windows stay plain."""
    from prunekit.batches import bos_id

    _model, tok, _cal, ev = smol
    assert tok.bos_token_id is not None and bos_id(tok) is None
    plain = evaluation_windows(tokenize(tok, prunekit.load_text("shakespeare", "evaluation")), 256, 8, bos=bos_id(tok))
    assert torch.equal(plain, ev) and not bool((ev[:, 0] == tok.bos_token_id).any())
