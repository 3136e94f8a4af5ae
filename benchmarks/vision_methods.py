"""The rest of training-time and CNN pruning (issue 20), each method next to the closest existing one at equal
sparsity / MACs / parameter budget and equal training epochs, on Fashion-MNIST models and the EfficientNet-Lite0
transfer (real ImageNet weights, adapted to Fashion-MNIST here and cached).

Parts (each in ``benchmarks/vision_methods_parts/<name>.py``, a ``run(ctx) -> dict`` with ``setup``, ``rows``,
``targets`` and optionally ``plot``, the row key to plot): see ``PARTS``. Writes
benchmarks/results/vision_methods.{json,md,png}; a part run again replaces only its own entry. Every run uses
1 CPU thread (the CNNs are small) unless ``--threads``.

    .venv/bin/python benchmarks/vision_methods.py                   # every part
    .venv/bin/python benchmarks/vision_methods.py --parts sap,lrp   # some
    .venv/bin/python benchmarks/vision_methods.py --quick           # smoke run: tiny subsets, 1 seed, nothing written
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_parts  # noqa: E402

from prunekit.vision.train import evaluate, load_data, make_config, train_epochs, train_prune  # noqa: E402,F401

CACHE = Path.home() / ".cache" / "prunekit" / "benchmarks"
PARTS = ("lrp", "sap", "polarization", "trp", "lapp", "gating", "tas", "rps", "udfc", "fedtiny", "analysis")


@dataclass
class Ctx:
    """What every part shares. ``quick`` shrinks every setting; ``seeds`` the seeds a part averages over."""

    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    train_subset: int = 10000
    test_subset: int = 5000
    _data: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.quick:
            self.seeds, self.train_subset, self.test_subset = (0,), 512, 256

    def data(self, seed: int = 0, image_size: int | None = None, rgb: bool = False, train: int | None = None,
             test: int | None = None) -> dict:
        """Fashion-MNIST: a seeded random subset of the training images, the first test images (cached)."""
        train = min(train or self.train_subset, self.train_subset) if self.quick else (train or self.train_subset)
        test = min(test or self.test_subset, self.test_subset) if self.quick else (test or self.test_subset)
        key = (seed, image_size, rgb, train, test)
        if key not in self._data:
            self._data[key] = load_data("fashion-mnist", train, test, seed, image_size, rgb=rgb)
        return self._data[key]

    def epochs(self, n: int) -> int:
        """Training epochs: ``n``, or 1 in a quick run."""
        return min(n, 1) if self.quick else n

    def config(self, **fields):
        """A train-prune recipe (``prunekit.vision.train.make_config``) with the quick run's epochs shrunk."""
        for k in ("epochs", "finetune_epochs"):
            if k in fields:
                fields[k] = self.epochs(fields[k])
        return make_config(**fields)

    def train_prune(self, data: dict, **fields):
        """``train_prune`` of a recipe on ``data``: (model, masks, info), no progress bars."""
        return train_prune(self.config(**fields), progress=False, data=data)

    @staticmethod
    def mean_std(xs) -> tuple[float, float]:
        xs = list(xs)
        return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def mean_row(self, label: str, r: dict, dense_macs: float, **means: tuple[str, int]) -> dict:
        """One table row from per-seed lists ``r``: accuracy mean ± std, mean MACs (and their share of
        ``dense_macs``) and parameters, plus ``key=(list name in r, digits)`` means."""
        acc, std = self.mean_std(r["acc"])
        macs = self.mean_std(r["macs"])[0]
        row = {"label": label, "acc": round(acc, 4), "acc_std": round(std, 4), "macs": int(macs),
               "macs_ratio": round(macs / dense_macs, 3), "params": int(self.mean_std(r["params"])[0])}
        row.update({k: round(self.mean_std(r[src])[0], digits) for k, (src, digits) in means.items()})
        return row

    @staticmethod
    def versus(a: dict, b: dict) -> str:
        """Row ``a``'s accuracy against row ``b``'s, one standard deviation each way: above / below / within."""
        if a["acc"] - a["acc_std"] > b["acc"] + b["acc_std"]:
            return "above"
        return "below" if a["acc"] + a["acc_std"] < b["acc"] - b["acc_std"] else "within the spread of"

    def lite0_fashion(self, epochs: int = 1, train: int = 6000, image_size: int = 64):
        """EfficientNet-Lite0 with its real ImageNet weights, its classifier replaced and the whole network fine-tuned
        ``epochs`` epoch(s) on ``train`` Fashion-MNIST images (64x64 RGB), cached under ~/.cache/prunekit; returns
        (model in eval mode, data). Deterministic: seed 0, 1 thread."""
        from safetensors.torch import load_file, save_file

        from prunekit.vision.models import build_model

        data = self.data(0, image_size, True, train, None)
        model = build_model("efficientnet-lite0", num_classes=10)
        if self.quick:
            return model.eval(), data
        path = CACHE / f"lite0_fashion_e{epochs}_n{train}_s{image_size}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(str(path)))
            return model.eval(), data
        cfg = make_config(model="efficientnet-lite0", lr=0.02, batch_size=64, seed=0)
        torch.manual_seed(0)
        train_epochs(model, data, epochs, cfg, None, "lite0 transfer", progress=False, seed=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.rename(path)
        return model.eval(), data


def _threads(ap) -> None:
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CNNs are small)")


def _ctx(args) -> Ctx:
    torch.set_num_threads(args.threads)
    return Ctx(quick=args.quick)


def main() -> None:
    run_parts("vision_methods", "The rest of training-time and CNN pruning", PARTS, _ctx, "acc", __doc__, _threads)


if __name__ == "__main__":
    main()
