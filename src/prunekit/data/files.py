"""Score and subset files (Parquet, written atomically). Provenance lives in the schema metadata under
``prunekit``: data set, split, number of examples, score/strategy and options, so that a file for another
data set is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prunekit.io import atomic_file
from prunekit.errors import PruneError


def _write(path, columns: dict, meta: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        v = np.asarray(v)
        if v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float32).ravel()), v.shape[1])
        else:
            arrays[k] = pa.array(v)
    table = pa.table(arrays).replace_schema_metadata({"prunekit": json.dumps(meta)})
    atomic_file(Path(path), lambda t: pq.write_table(table, str(t)))


def _read(path, kind: str):
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise PruneError(f"{p} does not exist; give the {kind} file written by `prunekit data "
                         f"{'score' if kind == 'score' else 'select'}`.")
    try:
        t = pq.read_table(str(p))
    except Exception as e:
        raise PruneError(f"{p} is not a Parquet {kind} file ({type(e).__name__}); give one written by prunekit.") from e
    meta = json.loads((t.schema.metadata or {}).get(b"prunekit", b"{}"))
    if meta.get("kind") not in (kind, f"data-{kind}"):  # "score" / "subset": files written before schema 1
        raise PruneError(f"{p} is not a prunekit {kind} file; give the one written by `prunekit data "
                         f"{'score' if kind == 'score' else 'select'}`.")
    cols = {}
    for name in t.column_names:
        col = t.column(name)
        if str(col.type).startswith("fixed_size_list"):
            flat = col.combine_chunks()
            cols[name] = np.asarray(flat.values.to_numpy(zero_copy_only=False)).reshape(len(flat), -1)
        else:
            cols[name] = col.to_numpy()
    return cols, meta


def save_scores(path, ds, res, *, cfg: dict | None = None, engine: str = "local", seconds: float | None = None):
    cols = {"index": np.arange(len(ds), dtype=np.int64), "score": res.values}
    if ds.y is not None:
        cols["label"] = ds.y
    for k in ("cluster", "centroid_distance", "embedding"):
        if k in res.extra:
            cols[k] = res.extra[k]
    from prunekit.io import record

    meta = record("data-score", {"score": res.name, **(cfg or {})}, timings={"seconds": seconds} if seconds is not None else None,
                  dataset=ds.name, split=ds.meta.get("split"), n=len(ds), score=res.name, fingerprint=ds.fingerprint(),
                  info=res.info, engine=engine)
    _write(path, cols, meta)


def load_scores(path):
    cols, meta = _read(path, "score")
    if len(cols["score"]) != meta.get("n"):
        raise PruneError(f"{path} has {len(cols['score'])} rows but says {meta.get('n')}; re-run `prunekit data score`.")
    return cols, meta


def save_keep(path, keep, n: int, meta: dict, recipe: dict | None = None):
    """A subset file: the kept indices, with the selection's ``recipe`` and provenance (``meta``) in the run
    record."""
    from prunekit.io import record

    meta = {k: v for k, v in meta.items() if k not in ("kind", "n")}
    _write(path, {"index": np.asarray(keep, dtype=np.int64)},
           record("data-subset", recipe, metrics={"kept": int(len(keep)), "fraction": len(keep) / max(1, int(n))},
                  n=int(n), **meta))


def load_keep(path, n: int | None = None, dataset: str | None = None, fingerprint: str | None = None):
    """Kept indices of a subset file, refused when it was selected on other data (``n`` rows, ``fingerprint``)."""
    cols, meta = _read(path, "subset")
    idx = cols["index"].astype(np.int64)
    if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
        raise PruneError(f"{path} was selected on other data (data fingerprint {meta.get('fingerprint')}, this data set "
                         f"has {fingerprint}); score and select on the data set (and split) you train on.")
    if n is not None and meta.get("n") != n:
        raise PruneError(f"{path} was selected from {meta.get('n')} examples but the data set has {n}; "
                         "score and select on the same data set (and split) you train on.")
    if n is not None and len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise PruneError(f"{path} has indices outside 0..{n - 1}; select again from this data set's scores.")
    return idx, meta


def is_prunekit_file(path) -> bool:
    """Whether ``path`` is a score or subset file prunekit wrote (the only files ``--overwrite`` replaces)."""
    try:
        import pyarrow.parquet as pq

        meta = pq.read_schema(str(path)).metadata or {}
        return json.loads(meta.get(b"prunekit", b"{}")).get("kind") in ("score", "subset", "data-score", "data-subset")
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
