"""Self-supervised prototype distance (Sorscher et al. 2022, "Beyond neural scaling laws"): embed every example
with a pretrained encoder, k-means the embeddings, score = cosine distance to the nearest centroid (far =
atypical = hard). Labels are not used. Also returns the cluster ids and embeddings for concept-cluster
budgets (dbp) and semantic dedup."""

import numpy as np

from prunekit.data.clusters import kmeans
from prunekit.data.embed import embed, resolve
from prunekit.data.scores import SCORES, ScoreResult


@SCORES.register("prototype", description="distance to the nearest k-means prototype (no labels)", needs_labels=False)
def score(ds, cfg, engine=None, progress=False):
    enc = resolve(ds, cfg.encoder)
    from prunekit.data.ssl import SSLConfig

    z = embed(ds, enc, engine=engine, seed=cfg.seed, dim=cfg.embed_dim, image_size=cfg.image_size, progress=progress,
              ssl=SSLConfig(steps=cfg.ssl_steps, seed=cfg.seed) if enc == "simclr" else None)
    k = cfg.clusters or (ds.num_classes if ds.y is not None else 10)
    cl = kmeans(z, min(k, len(ds)), seed=cfg.seed, engine=engine)
    c = cl.centroids / np.maximum(np.linalg.norm(cl.centroids, axis=1, keepdims=True), 1e-12)
    cos = (z.astype(np.float64) * c[cl.labels]).sum(1)
    return ScoreResult("prototype", 1.0 - cos, extra={"cluster": cl.labels, "embedding": z},
                       info={"encoder": enc, "clusters": int(k), "kmeans_iterations": cl.iterations, "dim": int(z.shape[1])})
