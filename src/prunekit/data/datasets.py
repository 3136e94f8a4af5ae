"""Data sets to prune: Fashion-MNIST, scikit-learn digits, and user data (image folder, .npy/.npz, CSV/JSONL text).

A :class:`DataSet` holds either images (uint8 ``[N, H, W]`` or ``[N, H, W, C]``), feature arrays (float
``[N, ...]``) or texts, plus optional int64 labels. ``load_dataset(spec)`` understands:

* ``fashion-mnist`` (split ``train``/``test``), ``digits`` (scikit-learn, a fixed stratified 75/25 split);
* a folder with one sub-folder of images per class (``--image-size`` pixels square, RGB);
* ``x.npy`` (labels from ``labels=...npy``) or ``data.npz`` with arrays ``x`` and optional ``y``;
* ``file.csv`` / ``file.jsonl`` with a text column (``text_column``) and an optional label column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prunekit.errors import PruneError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BUILTIN = ("fashion-mnist", "digits")


@dataclass
class DataSet:
    name: str
    kind: str  # "image" | "array" | "text"
    x: np.ndarray | None = None
    texts: list[str] | None = None
    y: np.ndarray | None = None
    classes: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts) if self.kind == "text" else int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        if self.y is None:
            return 0
        return len(self.classes) if self.classes else int(self.y.max()) + 1

    def subset(self, idx) -> "DataSet":
        idx = np.asarray(idx, dtype=np.int64)
        return DataSet(self.name, self.kind, None if self.x is None else self.x[idx],
                       None if self.texts is None else [self.texts[i] for i in idx],
                       None if self.y is None else self.y[idx], self.classes, dict(self.meta))

    def fingerprint(self) -> str:
        """A short hash of the examples and labels: a score or subset file made on other data does not match."""
        import hashlib

        h = hashlib.sha256(self.kind.encode())
        if self.texts is not None:
            for t in self.texts:
                h.update(t.encode("utf-8", "replace") + b"\0")
        else:
            h.update(str(self.x.shape).encode() + str(self.x.dtype).encode())
            h.update(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def require_labels(self, what: str) -> np.ndarray:
        if self.y is None:
            raise PruneError(f"{what} needs labels but {self.name!r} has none; give a label column/labels file "
                             "or use a label-free score (prototype, random).")
        return self.y


def _digits(split: str) -> DataSet:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=0.25, random_state=0, stratify=d.target)
    idx = {"train": idx_tr, "test": idx_te}.get(split)
    if idx is None:
        raise PruneError(f"digits has splits 'train' and 'test', not {split!r}.")
    idx = np.sort(idx)
    return DataSet("digits", "image", x[idx], y=d.target[idx].astype(np.int64),
                   classes=[str(i) for i in range(10)], meta={"split": split})


def _fashion(split: str) -> DataSet:
    from prunekit.zoo.images import FASHION_CLASSES, fashion_mnist

    x, y = fashion_mnist(split)
    return DataSet("fashion-mnist", "image", x.numpy(), y=y.numpy(), classes=list(FASHION_CLASSES),
                   meta={"split": split})


def _labels_from(values, where: str = "the labels") -> tuple[np.ndarray, list[str]]:
    import math

    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise PruneError(f"{where}: a label is missing (NaN or empty) at row {i}; label every example or drop it.")
    vals = [str(int(v)) if isinstance(v, float) and float(v).is_integer() else str(v) for v in values]
    classes = sorted(set(vals), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    lut = {c: i for i, c in enumerate(classes)}
    return np.array([lut[v] for v in vals], dtype=np.int64), classes


def _folder(path: Path, image_size: int) -> DataSet:
    from PIL import Image

    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    for ci, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                files.append(f)
                labels.append(ci)
    if not files:
        raise PruneError(f"No images found in {path}; give a folder with one sub-folder of images "
                         f"({', '.join(sorted(IMAGE_EXTS))}) per class.")
    x = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                x[i] = np.asarray(im.convert("RGB").resize((image_size, image_size), Image.BILINEAR))
        except OSError as e:
            raise PruneError(f"Cannot read image {f} ({e}); remove it or replace it with a valid image.") from e
    return DataSet(path.name, "image", x, y=np.array(labels, dtype=np.int64), classes=[d.name for d in class_dirs],
                   meta={"files": [str(f.relative_to(path)) for f in files]})


def _arrays(path: Path, labels: Path | None) -> DataSet:
    try:
        if path.suffix == ".npz":
            z = np.load(path, allow_pickle=False)
            if "x" not in z:
                raise PruneError(f"{path} has no array named 'x'; save it with np.savez(path, x=..., y=...).")
            x, y = z["x"], (z["y"] if "y" in z else None)
        else:
            x, y = np.load(path, allow_pickle=False), None
        if labels is not None:
            y = np.load(labels, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PruneError(f"Cannot read {path} as a NumPy array ({e}); save it with np.save.") from e
    if x.ndim < 2:
        raise PruneError(f"{path} holds a {x.ndim}-d array; give one row per example ([N, features] or [N, H, W]).")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise PruneError(f"The labels have shape {y.shape} but {path} has {x.shape[0]} examples; give one label per example.")
        y, classes = _labels_from(y.tolist(), f"The labels of {labels or path}")
    else:
        classes = None
    if x.shape[0] == 0:
        raise PruneError(f"{path} has no examples; give an array with at least one row.")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise PruneError(f"{path} holds {x.dtype} values; give a real-valued numeric array.")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise PruneError(f"{path} has {int((~np.isfinite(x)).sum())} NaN or Inf feature values (first in row {int(bad[0])}); "
                         "clean or impute them first.")
    kind = "image" if x.dtype == np.uint8 and x.ndim in (3, 4) else "array"
    return DataSet(path.stem, kind, x if kind == "image" else x.astype(np.float32), y=y, classes=classes)


def _read_table(path: Path, nrows: int | None = None):
    import pandas as pd

    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, nrows=nrows)
        return pd.read_json(path, lines=True, nrows=nrows)
    except pd.errors.EmptyDataError:
        raise PruneError(f"{path} is empty; give a CSV with a header row or a JSONL file, one object a line.") from None
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        msg = " ".join(str(e).split())[:160]
        raise PruneError(f"Cannot read {path} ({msg}); give a CSV with a header row or a JSONL file, one object a line.") from None


def _text(path: Path, text_column: str, label_column: str | None) -> DataSet:

    df = _read_table(path)
    if text_column not in df.columns:
        raise PruneError(f"{path} has no column {text_column!r} (columns: {', '.join(map(str, df.columns))}); "
                         "name the text column with --text-column.")
    if label_column is not None and label_column not in df.columns:
        raise PruneError(f"{path} has no column {label_column!r} (columns: {', '.join(map(str, df.columns))}); "
                         "name the label column with --label-column.")
    if len(df) == 0:
        raise PruneError(f"{path} has no rows; give a file with at least one example.")
    y = classes = None
    if label_column is not None:
        y, classes = _labels_from(df[label_column].tolist(), f"Column {label_column!r} of {path}")
    return DataSet(path.stem, "text", texts=[str(t) for t in df[text_column].tolist()], y=y, classes=classes)


def load_dataset(spec: str, split: str = "train", *, text_column: str = "text", label_column: str | None = "label",
                 labels: str | Path | None = None, image_size: int = 32) -> DataSet:
    """Load a built-in data set by name or user data from a path (see the module docstring)."""
    if not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise PruneError(f"--image-size must be a number of pixels in 1..4096, got {image_size}.")
    if spec in BUILTIN:
        return _fashion(split) if spec == "fashion-mnist" else _digits(split)
    p = Path(spec)
    if not p.exists():
        raise PruneError(f"{spec!r} is neither a built-in data set ({', '.join(BUILTIN)}) nor an existing path; "
                         "check the name or path.")
    if p.is_dir():
        return _folder(p, image_size)
    suffix = p.suffix.lower()
    if suffix in (".npy", ".npz"):
        return _arrays(p, Path(labels) if labels else None)
    if suffix in (".csv", ".jsonl", ".json"):
        if label_column == "label":  # the default: use it only when the file has it
            label_column = "label" if "label" in _read_table(p, nrows=1).columns else None
        return _text(p, text_column, label_column)
    raise PruneError(f"Cannot read {p} (unknown type {suffix!r}); give an image folder, .npy/.npz, .csv or .jsonl.")


def has_test_split(spec: str) -> bool:
    return spec in BUILTIN
