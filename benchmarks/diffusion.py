"""Diffusion pruning, measured on a diffusion model trained here (issue 22).

The model: prunekit's reference, a text-conditioned DDPM on Fashion-MNIST at 16x16 (``UNet2DConditionModel``
32/64/64 channels, cross-attention at 8x8, 4x4 and the mid block, 1.69M parameters; a 2-layer ``CLIPTextModel``
of width 64 reading "a photo of a <class>"), trained once by ``prunekit diffusion train-reference`` (4,000 steps of
64, EMA) and cached. No diffusion weights ship offline, so this is the model every figure below is measured on.

Quality of a pipeline: ``samples`` images (the ten classes in turn, the same seeded noise for every method), DDIM
``steps`` steps, classifier-free guidance 2. **Class fidelity** = the share the project's 16-px Fashion-MNIST
classifier (SmallCNN, trained once here) assigns to the class asked for; **FID** = Fréchet distance of that
classifier's 128-d penultimate features to the 10,000 test images' (comparable only within this file, at equal
samples); **s/img** = sampling seconds per image at batch 250 (this CPU, torch threads as the machine line says);
UNet parameters and MACs of one UNet call (convolutions, linear layers and the attention products).

Parts (``benchmarks/diffusion_parts/<name>.py``, ``run(ctx) -> dict``): see ``PARTS``.
Writes benchmarks/results/diffusion.{json,md,png} and diffusion_samples.png (a row of samples per method).

    .venv/bin/python benchmarks/diffusion.py                  # every part
    .venv/bin/python benchmarks/diffusion.py --parts dense,sweep
    .venv/bin/python benchmarks/diffusion.py --quick          # smoke run on a 30-step model, nothing written
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_parts

CACHE = Path.home() / ".cache" / "prunekit" / "benchmarks" / "diffusion"
PARTS = ("dense", "control", "methods", "aptp", "ldpruner", "tome", "peer", "sweep")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Ctx:
    quick: bool = False
    samples: int = 500
    steps: int = 20
    guidance: float = 2.0
    finetune: int = 250
    _memo: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.quick:
            self.samples, self.steps, self.finetune = 40, 4, 5
        (CACHE / self.tag).mkdir(parents=True, exist_ok=True)

    @property
    def tag(self) -> str:
        return "quick" if self.quick else "full"

    def reference(self):
        if "ref" not in self._memo:
            from prunekit.diffusion import load
            from prunekit.diffusion.reference import ReferenceConfig, reference

            cfg = ReferenceConfig(steps=30, warmup=5) if self.quick else ReferenceConfig()
            self._memo["ref_dir"] = reference(cfg)
            self._memo["ref"] = load(self._memo["ref_dir"])
        return self._memo["ref"]

    def recipe(self, method: str, ratio=None, finetune: int | None = None, ft_lr: float | None = None, **options):
        from prunekit.diffusion import DiffusionRecipe

        ft = self.finetune if finetune is None else finetune
        return DiffusionRecipe.make(method=method, ratio=ratio, options=options,
                                    finetune={"steps": ft, "batch_size": 64, **({"lr": ft_lr} if ft_lr else {})},
                                    calib_samples=32 if not self.quick else 10, calib_steps=10 if not self.quick else 3)

    def _path(self, key: str) -> Path:
        return CACHE / self.tag / key

    def measure(self, label: str, recipe=None, build=None, spec: dict | None = None) -> dict:
        """Prune the reference with ``recipe`` (or ``build(ref) -> (pipe, rows)``), evaluate, memoize on disk by
        the label + recipe (or ``spec``, the settings of a ``build``) + evaluation settings. Returns the row (and keeps the first 20 samples for the grid)."""
        from prunekit.diffusion import prune
        from prunekit.diffusion.evaluate import evaluate, generate

        rec = None if recipe is None else recipe.model_dump(mode="json")
        if rec is not None and not rec["finetune"]["steps"]:
            rec["finetune"] = {"steps": 0}  # the settings of a fine-tune that never runs do not change the row
        spec = {"label": label, "recipe": rec,
                "samples": self.samples, "steps": self.steps, "guidance": self.guidance, "spec": spec}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        p = self._path(key + ".json")
        if p.exists():
            return json.loads(p.read_text())
        ref = self.reference()
        if build is not None:
            pipe, rows = build(ref)
        elif recipe is not None:
            pipe, rows = prune(ref, recipe, progress=True)
        else:
            pipe, rows = ref, {}
        ev = evaluate(pipe, self.samples, steps=self.steps, guidance=self.guidance, seed=0)
        x, _, _ = generate(pipe, 20, steps=self.steps, guidance=self.guidance, seed=0)
        np.save(self._path(key + ".npy"), x.numpy(), allow_pickle=False)
        row = {"label": label, "class_fidelity": round(100 * ev["class_fidelity"], 2), "fid": round(ev["fid"], 3),
               "unet_params": ev["unet_params"], "unet_nonzero": ev["unet_nonzero"],
               "unet_macs_M": round(ev["unet_macs"] / 1e6, 2), "s_per_img": round(ev["seconds_per_image"], 4),
               "prune_s": round(rows.get("seconds", 0.0), 1), "key": key,
               "info": {k: v for k, v in rows.items() if k in ("ops", "widths", "finetune", "routing", "text_encoder",
                                                               "unet", "experts", "scores")}}
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, default=str))
        tmp.replace(p)
        return row

    def samples_of(self, row: dict) -> np.ndarray | None:
        p = self._path(row["key"] + ".npy")
        return np.load(p, allow_pickle=False) if p.exists() else None


def sample_grid(rows: list[dict], ctx: Ctx, path: Path) -> None:
    """One line per method: its first 20 samples (two per class, classes in order)."""
    from matplotlib.figure import Figure

    from prunekit.diffusion.evaluate import grid_image

    have = [(r, ctx.samples_of(r)) for r in rows]
    have = [(r, s) for r, s in have if s is not None]
    if not have:
        return
    fig = Figure(figsize=(10, 0.62 * len(have) + 0.4))
    for i, (r, s) in enumerate(have):
        ax = fig.add_subplot(len(have), 1, i + 1)
        ax.imshow(grid_image(torch.from_numpy(s), rows=1, cols=20), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.text(-2, 8, f"{r['label']}  ({r['class_fidelity']:.0f}%)", ha="right", va="center", fontsize=6)
    fig.subplots_adjust(left=0.25, right=0.99, top=0.99, bottom=0.01, hspace=0.15)
    fig.savefig(path, dpi=150)


def make_ctx(args) -> Ctx:
    torch.set_num_threads(args.threads)
    return Ctx(quick=args.quick, samples=args.samples, finetune=args.finetune)


def add_args(ap) -> None:
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--finetune", type=int, default=250, help="fine-tune steps after structural pruning")


if __name__ == "__main__":
    run_parts("diffusion", "Diffusion pruning (Fashion-MNIST DDPM trained here)", PARTS, make_ctx, "class_fidelity",
              __doc__, add_args)
