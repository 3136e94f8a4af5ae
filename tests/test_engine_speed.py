"""The engine's speed options: the whole calibration set per block ('all'), bf16 forwards, and the time split."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.calibrate import resolve_batch_size
from prunekit.errors import PruneError
from tests.conftest import tiny_model


def _masks(model):
    return {n: (p == 0) for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_whole_set_per_pass_gives_the_same_selection(calib_ids, method):
    a, rep_a = prunekit.prune(tiny_model("llama"), {"method": method, "calibration": {"batch_size": 4}}, calib_ids, progress=False)
    b, rep_b = prunekit.prune(tiny_model("llama"), {"method": method, "calibration": {"batch_size": "all"}}, calib_ids, progress=False)
    assert rep_b.recipe["calibration"]["batch_size"] == calib_ids.shape[0]  # recorded as what was used
    ma, mb = _masks(a), _masks(b)
    agree = sum(int((ma[k] == mb[k]).sum()) for k in ma) / sum(v.numel() for v in ma.values())
    assert agree > 0.995  # sums over other chunkings round differently, nothing else
    if method == "wanda":
        assert all(torch.equal(ma[k], mb[k]) for k in ma) or agree > 0.999


def test_all_falls_back_to_what_fits(monkeypatch, calib_ids):
    import prunekit.calibrate as C

    model = tiny_model("llama")
    assert resolve_batch_size(model, calib_ids, "all") == calib_ids.shape[0]
    per_seq = C.activation_bytes_per_token(model) * calib_ids.shape[1]
    monkeypatch.setattr(C, "available_bytes", lambda device: 4 * 5 * per_seq)  # room for about 5 sequences
    assert 1 <= resolve_batch_size(model, calib_ids, "all") <= 5
    assert resolve_batch_size(model, calib_ids, 3) == 3


def test_bf16_forwards_prune_close_to_fp32_and_time_is_split(calib_ids):
    a, rep_a = prunekit.prune(tiny_model("llama"), {"method": "wanda"}, calib_ids, progress=False)
    b, rep_b = prunekit.prune(tiny_model("llama"), {"method": "wanda", "calibration": {"precision": "bf16"}}, calib_ids,
                              progress=False)
    ma, mb = _masks(a), _masks(b)
    agree = sum(int((ma[k] == mb[k]).sum()) for k in ma) / sum(v.numel() for v in ma.values())
    assert 0.9 < agree < 1.0  # close, and not secretly fp32
    assert rep_b.summary["target_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert next(b.parameters()).dtype == torch.float32  # the weights stay fp32
    for k in ("prune_forward_s", "prune_stats_s", "prune_solve_s"):
        assert rep_a.times[k] >= 0
    with pytest.raises(PruneError, match="precision"):
        prunekit.prune(tiny_model("llama"), {"method": "wanda", "calibration": {"precision": "fp16"}}, calib_ids, progress=False)
    with pytest.raises(PruneError, match="batch_size"):
        prunekit.prune(tiny_model("llama"), {"method": "wanda", "calibration": {"batch_size": "some"}}, calib_ids, progress=False)
