"""Prune-combine-augment (prunekit.data.compose): canvases hold the area-downsampled images, the storage accounting
is the bytes actually kept, the budget gives the right number of images, and the student trains from labels or
from a teacher on augmented canvases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.data.compose import combine, downsample, images_within, random_resized_crop, stored_bytes, train_student
from prunekit.data.train import TrainConfig, accuracy, fit
from prunekit.errors import PruneError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small trainings: one torch thread (tests/conftest.py)."""


def images(n=10, size=8, channels=None, seed=0):
    shape = (n, size, size) + ((channels,) if channels else ())
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def block_mean(x, f):
    """The reference area downsampling: the mean of every f x f block, rounded."""
    n, h, w = x.shape[:3]
    return np.rint(x.reshape(n, h // f, f, w // f, f, *x.shape[3:]).astype(np.float64).mean((2, 4))).astype(np.uint8)


@pytest.mark.parametrize("f", [2, 4])
def test_canvas_tiles_are_the_area_downsampled_sources(f):
    x = images(10)
    canvases, sources = combine(x, f)
    per = f * f
    assert canvases.shape == (-(-10 // per), 8, 8) and canvases.dtype == np.uint8
    assert sources.shape == (len(canvases), per)
    assert sources.ravel()[:10].tolist() == list(range(10)) and (sources.ravel()[10:] == -1).all()
    small, t = block_mean(x, f), 8 // f
    for j, row in enumerate(sources):
        for k, i in enumerate(row):
            r, c = divmod(k, f)
            tile = canvases[j, r * t:(r + 1) * t, c * t:(c + 1) * t]
            if i < 0:
                assert (tile == 0).all()  # an empty slot stays black
                continue
            assert np.array_equal(tile, small[i])
            # upsampled back (nearest), the tile is the source with every block replaced by its mean
            up = np.kron(tile, np.ones((f, f), dtype=np.uint8))
            blocks = np.rint(x[i].reshape(t, f, t, f).mean((1, 3))).astype(np.uint8)
            assert np.array_equal(up, np.kron(blocks, np.ones((f, f), dtype=np.uint8)))
    assert np.array_equal(downsample(x, f), small)


def test_factor_1_is_identity_and_colour_and_odd_sizes_work():
    x = images(5)
    canvases, sources = combine(x, 1)
    assert np.array_equal(canvases, x) and sources.ravel().tolist() == list(range(5))
    rgb = images(4, channels=3)
    canvases, _ = combine(rgb, 2)
    assert canvases.shape == (1, 8, 8, 3) and np.array_equal(canvases[0, :4, 4:], block_mean(rgb, 2)[1])
    odd = images(4, size=9)
    canvases, _ = combine(odd, 2)
    assert canvases.shape == (1, 9, 9) and (canvases[0, 8] == 0).all() and (canvases[0, :, 8] == 0).all()


@pytest.mark.parametrize("f", [1, 2, 4])
def test_storage_accounting_is_the_bytes_kept(f):
    shape = (8, 8)
    budget = 1000  # 15 whole 64-byte canvases
    n = images_within(budget, shape, f)
    assert n == 15 * f * f
    canvases, _ = combine(images(n), f)
    assert len(canvases) == 15 and stored_bytes(canvases) == canvases.nbytes == 15 * 64
    assert stored_bytes(canvases) <= budget < stored_bytes(canvases) + 64  # no other whole canvas fits
    assert stored_bytes(images(3), images(2, channels=3)) == 3 * 64 + 2 * 192
    assert images_within(192, (8, 8, 3), 2) == 4 and images_within(512, shape, 2, itemsize=4) == 8


@pytest.mark.parametrize("call, phrase", [
    (lambda: combine(images(), 0), "whole number of at least 1"),
    (lambda: combine(images(), 2.5), "whole number of at least 1"),
    (lambda: combine(images(), 9), "at most 8"),
    (lambda: combine(images().astype(np.float32), 2), "uint8"),
    (lambda: combine(images(0), 2), "no images"),
    (lambda: images_within(63, (8, 8), 2), "at least one image (64 bytes)"),
    (lambda: images_within(-5, (8, 8)), "at least one image"),
    (lambda: images_within(float("nan"), (8, 8)), "at least one image"),
    (lambda: images_within(1000, (8, 8), 0), "whole number"),
    (lambda: train_student(images(), 10, TrainConfig(steps=1)), "labels or a teacher"),
    (lambda: train_student(images(), 10, TrainConfig(steps=1), labels=np.zeros(3)), "one label per image"),
])
def test_bad_input_is_one_sentence(call, phrase):
    with pytest.raises(PruneError) as e:
        call()
    msg = str(e.value)
    assert phrase in msg and "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0


def test_crop_at_full_scale_without_flip_is_identity():
    x = torch.rand(3, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(random_resized_crop(x, g, (1.0, 1.0), (1.0, 1.0), flip=False), x, atol=1e-6)
    y = random_resized_crop(x, g, (0.3, 1.0))
    assert y.shape == x.shape and not torch.allclose(y, x)


def _planted(n=160, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, (4, 8, 8))
    y = np.arange(n) % 4
    return np.clip(protos[y] + rng.normal(0, 20, (n, 8, 8)), 0, 255).astype(np.uint8), y


def test_student_from_hard_labels_and_from_a_teacher_on_canvases():
    x, y = _planted()
    xt = torch.from_numpy(x).float().div(255)[:, None]
    cfg = TrainConfig(steps=60, batch_size=32, seed=0)
    hard = train_student(x, 4, cfg, labels=y)
    assert accuracy(hard, xt, torch.from_numpy(y)) > 0.9
    again = train_student(x, 4, cfg, labels=y)
    assert all(torch.equal(a, b) for a, b in zip(hard.state_dict().values(), again.state_dict().values()))
    teacher = fit(xt, torch.from_numpy(y), 4, cfg)
    canvases, _ = combine(x, 2)  # 40 canvases of 4 quarter-size images: no labels stored
    student = train_student(canvases, 4, TrainConfig(steps=80, batch_size=16, seed=0), teacher=teacher, augment=True,
                            stats_from=xt)
    assert accuracy(student, xt, torch.from_numpy(y)) > 0.5  # chance is 0.25
