import pytest
import torch

from prunekit.masks import global_masks, n_of_m, per_layer, per_row, smallest_k


def test_smallest_k_exact_with_ties():
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    m = smallest_k(flat, 3)
    assert int(m.sum()) == 3
    assert m[5]  # the strict minimum is always taken
    assert not m[4]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_per_row_and_per_layer_counts(sparsity):
    s = torch.randn(7, 40).round()  # many ties
    r = per_row(s, int(40 * sparsity) * 7)
    assert (r.sum(1) == int(40 * sparsity)).all()
    layer = per_layer(s, int(s.numel() * sparsity))
    assert int(layer.sum()) == int(s.numel() * sparsity)
    # the pruned entries are the lowest ones of each row
    for i in range(7):
        if r[i].any() and (~r[i]).any():
            assert s[i][r[i]].max() <= s[i][~r[i]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 4)])
def test_n_of_m_exact(n, m):
    s = torch.randn(5, 12 * m)
    mask = n_of_m(s, n, m)
    groups = mask.view(5, -1, m)
    assert (groups.sum(-1) == n).all()
    sg = s.view(5, -1, m)
    assert (sg.masked_fill(~groups, -1e9).amax(-1) <= sg.masked_fill(groups, 1e9).amin(-1)).all()


def test_per_row_spreads_a_remainder():
    s = torch.randn(4, 10)
    r = per_row(s, 4 * 3 + 2)  # 14 over 4 rows: two rows lose 4, two rows lose 3
    assert r.sum(1).tolist() == [4, 4, 3, 3]


def test_split_count_exact():
    from prunekit.masks import split_count

    assert split_count(10, [5, 5, 5]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(split_count(12345, [100, 5000, 7000, 300])) == 12345
    assert split_count(5, [2, 2]) == [2, 2]  # never above a part's size


def test_global_masks_single_threshold():
    a, b = torch.rand(10, 10), torch.rand(4, 4) + 0.5
    ma, mb = global_masks([a, b], 0.5)
    assert int(ma.sum() + mb.sum()) == int(116 * 0.5)
    pruned = torch.cat([a[ma], b[mb]])
    kept = torch.cat([a[~ma], b[~mb]])
    assert pruned.max() <= kept.min()
