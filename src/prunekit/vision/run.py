"""A vision run directory: ``model.safetensors`` (weights and uint8 ``mask::<name>`` tensors) + ``prunekit.json``
+ ``curves.json`` + ``curves.png``, written atomically and read back without pickle."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from prunekit.core.masks import Masks
from prunekit.errors import PruneError
from prunekit.vision.models import build_model


def save_run(out: str | Path, model: nn.Module, cfg, masks: Masks | None, info: dict,
             overwrite: bool = False) -> Path:
    """Write ``out`` atomically: model.safetensors (weights, and masks as uint8 ``mask::<name>`` tensors),
    prunekit.json (recipe, metrics, tensor shapes for rebuilding), curves.json, curves.png."""
    from safetensors.torch import save_file

    from prunekit.core.masks import prunable
    from prunekit.io import atomic_dir, check_output, dumps, record

    out = check_output(out, overwrite)
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if masks is not None:
            tensors.update(masks.state())
        save_file(tensors, str(tmp / "model.safetensors"))
        from prunekit.vision.channels import shapes_of

        layers = []
        for name, p in (prunable(model) if masks is None else {k: dict(model.named_parameters())[k] for k in masks}).items():
            zeros = int((p == 0).sum())
            layers.append({"name": name, "shape": list(p.shape), "params": p.numel(), "zeros": zeros,
                           "sparsity": zeros / max(1, p.numel())})
        extra = {k: info[k] for k in ("dense_acc", "acc_after_prune", "rounds", "gradual", "precrop_ratios", "learn", "sap")
                 if k in info}
        manifest = record("vision", cfg.model_dump(), metrics=info.get("metrics"),
                          timings={"train_prune_s": info["seconds"]} if "seconds" in info else None, layers=layers,
                          shapes=shapes_of(model), channels=info.get("channels"),
                          summary=run_summary(model, masks, info), **extra)
        (tmp / "prunekit.json").write_text(dumps(manifest))
        (tmp / "curves.json").write_text(dumps(info.get("history", [])))
        _plot_curves(info.get("history", []), tmp / "curves.png", f"{cfg.model} {cfg.criterion}/{cfg.allocation} {cfg.schedule}")
    return out


def run_summary(model: nn.Module, masks: Masks | None, info: dict) -> dict:
    """The record's ``summary``: parameters and non-zeros of the saved model, the sparsity of the masked weights
    (``target_sparsity``; channel runs: ``params_ratio``, parameters after / before) and ``journey``, the
    live-parameter count over training (:class:`prunekit.core.journey.Journey`: ``average_params`` ...)."""
    params = sum(p.numel() for p in model.parameters())
    out: dict = {"params": params, "nonzeros": sum(int((p != 0).sum()) for p in model.parameters())}
    if masks is not None:
        out["target_sparsity"] = masks.sparsity()
    ch = info.get("channels")
    if isinstance(ch, dict) and ch.get("params_before"):
        out["params_ratio"] = ch["params_after"] / ch["params_before"]
    if "journey" in info:
        out["journey"] = info["journey"]
    return out


def _plot_curves(history: list, path: Path, title: str) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    xs = list(range(1, len(history) + 1))
    ax[0].plot(xs, [h["test_acc"] for h in history], "o-", label="test accuracy")
    ax[0].plot(xs, [h["train_acc"] for h in history], "s--", label="train accuracy")
    ax[0].set_xlabel("epoch (all phases)")
    ax[0].legend()
    ax[1].plot(xs, [h["sparsity"] for h in history], "o-", color="C3")
    ax[1].set_ylabel("sparsity")
    ax[1].set_xlabel("epoch (all phases)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_run(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, Masks | None, dict]:
    """Rebuild a saved run: the zoo model named in the manifest (or ``model``, the same architecture a user
    passed), resized to the saved shapes (a learned method's own architecture change first, through its
    ``LEARNED`` entry's ``rebuild(model, manifest) -> model``), weights loaded strictly; masks if saved."""
    from safetensors.torch import load_file

    from prunekit.vision.channels import rebuild

    path = Path(path)
    if not (path / "prunekit.json").is_file() or not (path / "model.safetensors").is_file():
        raise PruneError(f"{path} is not a prunekit vision run (no prunekit.json / model.safetensors).")
    manifest = json.loads((path / "prunekit.json").read_text())
    if model is None:
        model = build_model(manifest["recipe"]["model"], num_classes=10, pretrained=False)
    learn = manifest["recipe"].get("learn")
    if learn:  # a learner that changes the architecture beyond channel counts rebuilds it (entry meta "rebuild")
        from prunekit.vision.learn import LEARNED

        fix = LEARNED.get(learn).meta.get("rebuild")
        if fix is not None:
            model = fix(model, manifest)
    rebuild(model, manifest["shapes"])
    sd = load_file(str(path / "model.safetensors"))
    masks = Masks.from_state(sd) if any(k.startswith("mask::") for k in sd) else None
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("mask::")}, strict=True)
    return model.eval(), masks, manifest
