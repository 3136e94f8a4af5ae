"""Data pruning in the data-limited regime (issue 21): the protocol where accuracy still rises with data, so a
score can win or lose; self-supervised prototypes; the scaling view; the distillation findings; dataset pruning
for transfer learning (DP4TL); prune-combine-augment. Fashion-MNIST, 3 seeds, mean ± std.

The protocol: 5,000 of the 60,000 training images are carved off (stratified, seed 0) as the validation split for
early stopping; the other 55,000 are the pool that every score ranks and every subset is drawn from; the 10,000
test images are touched only to report accuracy. A frozen EfficientNet-Lite0 (real ImageNet weights, images at 64
px) embeds every image once (cached), the embeddings are projected on their top 256 principal components (fitted
on the pool), and a one-hidden-layer MLP head (256 units) is trained on each subset to convergence: epochs scaled so
every subset gets about the same number of steps, the epoch with the best validation accuracy kept. The compute-
limited contrast (a fixed 300 steps, a 10k pool) stays in benchmarks/data_pruning.py.

Parts (each in ``benchmarks/data_pruning_limited_parts/<name>.py``, ``run(ctx) -> dict``): see ``PARTS``.
Writes benchmarks/results/data_pruning_limited.{json,md,png}; a part run again replaces only its own entry; the
top-level keys ``full_accuracy`` and ``random_10_accuracy`` come from the ``grid`` part.

    .venv/bin/python benchmarks/data_pruning_limited.py                    # every part
    .venv/bin/python benchmarks/data_pruning_limited.py --parts grid       # some
    .venv/bin/python benchmarks/data_pruning_limited.py --quick            # smoke run, nothing written
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_parts  # noqa: E402

CACHE = Path.home() / ".cache" / "prunekit" / "benchmarks" / "data_limited"
PARTS = ("grid", "ssl", "scaling", "distill", "dp4tl", "pca", "cnn")
PCA_DIM = 256
HEAD_STEPS = 1500
SUPERVISED = ("el2n", "forgetting", "aum", "entropy")
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


def ccs_beta(fraction: float) -> float:
    """CCS's hard cutoff: larger when less is kept (the CCS repository runs CIFAR-10 at 90% pruning with 0.3)."""
    return 0.3 if fraction <= 0.1 else 0.2 if fraction <= 0.2 else 0.1 if fraction <= 0.3 else 0.0


@dataclass
class Ctx:
    """What every part shares. ``quick`` shrinks every setting; ``seeds`` the seeds a part averages over."""

    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    val_size: int = 5000
    _memo: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.quick:
            self.seeds = (0,)
        CACHE.mkdir(parents=True, exist_ok=True)

    @property
    def cache(self) -> Path:
        return CACHE / ("quick" if self.quick else "full")

    # ---- data
    def images(self) -> dict:
        """``train`` (the 60k training DataSet; a 3,000-image stratified sample in a quick run), ``test`` (10k; 1,000
        in a quick run), ``pool`` and ``val`` (indices into ``train``: the validation split never overlaps the pool,
        and the test images are another file)."""
        if "images" not in self._memo:
            from prunekit.data import load_dataset
            from prunekit.data.select import validation_split

            train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
            val_size = self.val_size
            if self.quick:
                rng = np.random.default_rng(0)
                train = train.subset(np.sort(rng.permutation(len(train))[:3000]))
                test = test.subset(np.arange(1000))
                val_size = 500
            pool, val = validation_split(train.y, val_size, seed=0)
            self._memo["images"] = {"train": train, "test": test, "pool": pool, "val": val}
        return self._memo["images"]

    # ---- the frozen-feature protocol
    def features(self) -> dict:
        """EfficientNet-Lite0 (ImageNet weights, 64 px) embeddings of every train and test image (cached by
        ``prunekit.data.embed``), projected on the top ``PCA_DIM`` principal components of the pool's: ``x`` [60k,
        d] and ``xt`` [10k, d] float tensors, labels ``y`` / ``yt``."""
        if "features" not in self._memo:
            from sklearn.decomposition import PCA

            from prunekit.data.embed import embed

            im = self.images()
            z = embed(im["train"], "efficientnet-lite0", image_size=64, cache=self.cache / "embeddings", progress=True)
            zt = embed(im["test"], "efficientnet-lite0", image_size=64, cache=self.cache / "embeddings", progress=True)
            pca = PCA(min(PCA_DIM, len(im["pool"]) - 1), random_state=0).fit(z[im["pool"]])
            f = {"x": torch.from_numpy(pca.transform(z)).float(), "xt": torch.from_numpy(pca.transform(zt)).float(),
                 "y": torch.from_numpy(im["train"].y), "yt": torch.from_numpy(im["test"].y)}
            self._memo["features"] = f
        return self._memo["features"]

    def feature_pool(self):
        """The pool as a feature-array DataSet (what the supervised scores train their MLP on)."""
        from prunekit.data.datasets import DataSet

        f, im = self.features(), self.images()
        return DataSet("fashion-mnist-lite0-features", "array", f["x"][im["pool"]].numpy(), y=im["train"].y[im["pool"]])

    def head_config(self, seed: int, **over):
        from prunekit.data.train import TrainConfig

        kw = dict(model="mlp", steps=HEAD_STEPS if not self.quick else 100, batch_size=256, lr=2e-3, seed=seed)
        kw.update(over)
        return TrainConfig(**kw)

    def head(self, keep, seed: int, *, teacher_logits=None, label: str = "", **over) -> float:
        """Test accuracy (0-1) of the MLP head trained on the pool examples ``keep`` (indices into the pool) to
        convergence, the best validation epoch kept. Runs are memoized on disk by ``label`` + settings (parts
        share them); ``label`` must name the selection uniquely."""
        import hashlib
        import json

        from prunekit.data.train import accuracy, fit

        keep = np.sort(np.asarray(keep, dtype=np.int64))
        cfg = self.head_config(seed, **over)
        key = hashlib.sha256(json.dumps([label, cfg.model_dump(), hashlib.sha256(keep.tobytes()).hexdigest(),
                                         teacher_logits is not None], sort_keys=True).encode()).hexdigest()[:24]
        runs = self._runs()
        if key in runs:
            return runs[key]
        f, im = self.features(), self.images()
        idx = torch.from_numpy(im["pool"][keep])
        val = (f["x"][torch.from_numpy(im["val"])], f["y"][torch.from_numpy(im["val"])])
        model = fit(f["x"][idx], f["y"][idx], 10, cfg, stats_from=f["x"][torch.from_numpy(im["pool"])], val=val,
                    teacher_logits=None if teacher_logits is None else teacher_logits[keep])
        acc = accuracy(model, f["xt"], f["yt"])
        runs[key] = acc
        with open(self.cache / "runs.jsonl", "a") as fh:
            fh.write(json.dumps({"key": key, "label": label, "seed": seed, "n": int(len(keep)), "acc": acc}) + "\n")
        return acc

    def _runs(self) -> dict:
        import json

        if "runs" not in self._memo:
            path = self.cache / "runs.jsonl"
            runs = {}
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interrupted run
                        continue
                    runs[r["key"]] = r["acc"]
            self._memo["runs"] = runs
        return self._memo["runs"]

    def teacher_logits(self, seed: int, hidden: int = 256, model: str = "mlp") -> torch.Tensor:
        """Logits on every pool example of a teacher head trained on the whole pool (seed ``seed``; ``hidden``
        units, or a linear probe with ``model='linear'``), with early stopping on the validation split; cached
        (safetensors) with its test accuracy."""
        from safetensors.torch import load_file, save_file

        from prunekit.data.train import accuracy, fit, predict

        path = self.cache / f"teacher-{model}-{hidden}-{seed}.safetensors"
        if path.exists():
            return load_file(str(path))["logits"]
        f, im = self.features(), self.images()
        pool, val = torch.from_numpy(im["pool"]), torch.from_numpy(im["val"])
        t = fit(f["x"][pool], f["y"][pool], 10, self.head_config(seed, model=model, hidden=hidden),
                stats_from=f["x"][pool], val=(f["x"][val], f["y"][val]))
        logits = predict(t, f["x"][pool])
        tmp = path.with_suffix(".tmp")
        save_file({"logits": logits.contiguous(), "test_acc": torch.tensor([accuracy(t, f["xt"], f["yt"])])}, str(tmp))
        tmp.replace(path)
        return logits

    def teacher_accuracy(self, seed: int, hidden: int = 256, model: str = "mlp") -> float:
        from safetensors.torch import load_file

        self.teacher_logits(seed, hidden, model)
        return float(load_file(str(self.cache / f"teacher-{model}-{hidden}-{seed}.safetensors"))["test_acc"][0])

    # ---- scores (on the pool)
    def scores(self) -> dict:
        """name -> one float per pool example (higher = harder), computed once and cached as score files.
        Supervised scores train the protocol's MLP on the features; prototypes embed the images."""
        if "scores" in self._memo:
            return self._memo["scores"]
        from prunekit.data import ScoreConfig, load_scores, save_scores, score

        im = self.images()
        pool_images = im["train"].subset(im["pool"])
        feats = self.feature_pool()
        q = self.quick
        specs = {name: (feats, ScoreConfig(model="mlp", seeds=1 if q else 3)) for name in SUPERVISED}
        specs["prototype-pca"] = (pool_images, ScoreConfig(encoder="pca", clusters=10))
        specs["prototype-lite0"] = (pool_images, ScoreConfig(encoder="efficientnet-lite0", clusters=10))
        specs["prototype-simclr"] = (pool_images, ScoreConfig(encoder="simclr", clusters=10))
        out = {}
        import time

        for name, (ds, cfg) in specs.items():
            path = self.cache / f"score-{name}.parquet"
            if not path.exists():
                t0 = time.perf_counter()
                res = score(ds, name.split("-")[0], cfg, progress=True)
                save_scores(path, ds, res, cfg=cfg.to_dict(), seconds=time.perf_counter() - t0)
            cols, meta = load_scores(path)
            out[name] = np.asarray(cols["score"], dtype=np.float64)
            self._memo.setdefault("score_seconds", {})[name] = meta["timings"]["seconds"]
        self._memo["scores"] = out
        return out

    def keep(self, score: str, strategy: str, fraction: float, seed: int) -> np.ndarray:
        """Pool indices a selection keeps (``score`` 'random' ignores the strategy)."""
        from prunekit.data import select

        n = len(self.images()["pool"])
        if score == "random":
            return select(np.zeros(n), fraction, "random", seed=seed)
        beta = ccs_beta(fraction) if strategy == "ccs" else 0.0
        return select(self.scores()[score], fraction, strategy, seed=seed, beta=beta)

    @staticmethod
    def mean_std(xs) -> tuple[float, float]:
        xs = list(xs)
        return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def row(self, label: str, accs, **extra) -> dict:
        """A table row: test accuracy in percent, mean ± std over seeds."""
        m, s = self.mean_std(100 * a for a in accs)
        return {"label": label, "acc": round(m, 2), "acc_std": round(s, 2), **extra}

    @staticmethod
    def versus(a: dict, b: dict) -> str:
        """Row ``a`` against row ``b``, one standard deviation each way: above / below / within."""
        if a["acc"] - a["acc_std"] > b["acc"] + b["acc_std"]:
            return "above"
        return "below" if a["acc"] + a["acc_std"] < b["acc"] - b["acc_std"] else "within the spread of"


def _threads(ap) -> None:
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def _ctx(args) -> Ctx:
    torch.set_num_threads(args.threads)
    return Ctx(quick=args.quick)


def main() -> None:
    run_parts("data_pruning_limited", "Data pruning in the data-limited regime", PARTS, _ctx, "acc", __doc__, _threads)


if __name__ == "__main__":
    main()
