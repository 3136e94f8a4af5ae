"""Vision pruning benchmark (issue 6): Fashion-MNIST accuracy vs sparsity for each criterion x schedule, and
EfficientNet-Lite0 channel pruning (latency, top-1 agreement on real photos, accuracy after fine-tuning).

    flock /tmp/prunekit-cpu.lock nice -n 10 .venv/bin/python benchmarks/vision_pruning.py

Writes benchmarks/results/vision_pruning.{md,json,png}. Everything runs on 1 CPU thread. What runs, exactly:

* Fashion-MNIST: prunekit's SmallCNN at width 8 (4 conv + BatchNorm, 2 fc; 105,970 parameters, of which the
  105,808 conv/linear weights are prunable), a random subset of ``--train-subset`` training images (new subset per
  seed), the first ``--test-subset`` test images, SGD + Nesterov, batch 128, lr 0.05 cosine per phase, wd 5e-4.
  Per seed: one dense model trained ``--dense-epochs`` epochs (its weights at iteration ``--rewind-step`` kept for
  rewinding), then per sparsity:
    - oneshot (dense -> prune -> ``--finetune-epochs`` fine-tune): magnitude with uniform / global / Global MP
      (global-min, --min-density) / LAMP allocation, and first-order Taylor with global-min;
    - at-init (prune the initial weights, train dense+finetune epochs): SNIP, GraSP, SynFlow (100 iterations),
      random with ERK;
    - gradual (Zhu & Gupta cubic, layer-wise magnitude, from 10% to 70% of dense+finetune epochs, every 10 steps);
    - scratch: the oneshot global-min magnitude mask on freshly initialized weights, trained dense+finetune epochs;
    - lottery: one IMP trajectory per seed through 50 -> 80 -> 90 -> 95 -> 98% (global-min magnitude), survivors
      rewound to iteration ``--rewind-step``, ``--dense-epochs`` epochs per round.
* EfficientNet-Lite0 (real ImageNet weights): Torch-Pruning's graph removes 30% / 50% of every coupled channel
  group (group L2 magnitude; classifier kept); latency of one 224x224 image (median of 20, 1 thread), top-1
  agreement with the dense model on the RGB photos of skimage.data, and Fashion-MNIST accuracy (64x64, grey to
  RGB) after fine-tuning the dense and pruned backbones ``--effnet-epochs`` epoch(s) on ``--effnet-train`` images.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from prunekit.vision.channels import count_macs, prune_channels
from prunekit.vision.models import SmallCNN, efficientnet_lite0, sample_photos
from prunekit.vision.schedules import Rewinder
from prunekit.vision.train import (evaluate, load_data, lottery, make_config, prune_once, recalibrate_bn,
                                   reinitialize, train_epochs, train_prune)

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
ONESHOT = (("magnitude", "uniform"), ("magnitude", "global"), ("magnitude", "global-min"), ("magnitude", "lamp"),
           ("taylor", "global-min"))
AT_INIT = (("snip", "global"), ("grasp", "global"), ("synflow", "global"), ("random", "erk"))


def allocation_of(label: str, min_density: float) -> dict:
    """Row label -> config fields. 'global-min' (Global MP) is global allocation with the per-layer floor; every
    other row has no floor."""
    if label == "global-min":
        return {"allocation": "global", "min_density": min_density}
    return {"allocation": label, "min_density": None}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fashion_part(args) -> list[dict]:
    rows: list[dict] = []
    for seed in range(args.seeds):
        t_seed = time.perf_counter()
        data = load_data("fashion-mnist", args.train_subset, args.test_subset, seed)
        base = make_config(model="cnn", epochs=args.dense_epochs, finetune_epochs=args.finetune_epochs, seed=seed,
                           min_density=args.min_density, rewind_step=args.rewind_step, prune_every=10,
                           synflow_iterations=100, allocation="global")
        torch.manual_seed(seed)
        model = SmallCNN(10, 8)
        init_state = copy.deepcopy(model.state_dict())
        rew = Rewinder()

        def save_early(step):
            if step == args.rewind_step:
                rew.save(model, step)

        train_epochs(model, data, args.dense_epochs, base, None, "dense", progress=False, on_step=save_early, seed=seed)
        dense_state = copy.deepcopy(model.state_dict())
        dense_acc = evaluate(model, data["x_test"], data["y_test"])
        rows.append({"seed": seed, "schedule": "dense", "method": "dense", "sparsity": 0.0, "acc": dense_acc})
        log(f"seed {seed}: dense {dense_acc:.4f}")
        total_epochs = args.dense_epochs + args.finetune_epochs
        for s in SPARSITIES:
            for crit, alloc in ONESHOT:
                cfg = base.model_copy(update={"criterion": crit, **allocation_of(alloc, args.min_density)})
                model.load_state_dict(dense_state)
                masks = prune_once(model, data, cfg, s)
                masks.apply(model)
                before = evaluate(model, data["x_test"], data["y_test"])
                train_epochs(model, data, args.finetune_epochs, cfg, masks, "finetune", progress=False, seed=seed + 1)
                dens = masks.layer_density()
                rows.append({"seed": seed, "schedule": "oneshot", "method": f"{crit}/{alloc}", "sparsity": s,
                             "acc": evaluate(model, data["x_test"], data["y_test"]), "acc_before_finetune": before,
                             "real_sparsity": masks.sparsity(), "min_layer_density": min(dens.values()),
                             "empty_layers": [k for k, v in dens.items() if v == 0.0], "layer_density": dens})
                if crit == "magnitude" and alloc == "global-min":
                    scratch_masks = masks.copy()
            for crit, alloc in AT_INIT:
                cfg = base.model_copy(update={"criterion": crit, **allocation_of(alloc, args.min_density)})
                model.load_state_dict(init_state)
                masks = prune_once(model, data, cfg, s)
                masks.apply(model)
                train_epochs(model, data, total_epochs, cfg, masks, "at-init", progress=False, seed=seed)
                dens = masks.layer_density()
                rows.append({"seed": seed, "schedule": "at-init", "method": f"{crit}/{alloc}", "sparsity": s,
                             "acc": evaluate(model, data["x_test"], data["y_test"]), "real_sparsity": masks.sparsity(),
                             "min_layer_density": min(dens.values()),
                             "empty_layers": [k for k, v in dens.items() if v == 0.0]})
            # gradual: cubic schedule, layer-wise magnitude, from the same initialization
            cfg = base.model_copy(update={"criterion": "magnitude", "allocation": "uniform", "min_density": None, "schedule": "gradual",
                                          "sparsity": s, "epochs": args.dense_epochs})
            model.load_state_dict(init_state)
            m2, masks, info = train_prune(cfg, progress=False, model=model, data=data)
            rows.append({"seed": seed, "schedule": "gradual", "method": "magnitude/uniform", "sparsity": s,
                         "acc": info["metrics"]["test_acc"], "real_sparsity": masks.sparsity()})
            # scratch: the oneshot Global-MP mask, fresh weights
            reinitialize(model, seed + 100)
            scratch_masks.apply(model)
            train_epochs(model, data, total_epochs, base, scratch_masks, "scratch", progress=False, seed=seed + 100)
            rows.append({"seed": seed, "schedule": "scratch", "method": "magnitude/global-min", "sparsity": s,
                         "acc": evaluate(model, data["x_test"], data["y_test"]), "real_sparsity": scratch_masks.sparsity()})
            log(f"seed {seed}: sparsity {s:.0%} done ({time.perf_counter() - t_seed:.0f}s)")
        # lottery: one IMP trajectory through all sparsities, rewinding to iteration rewind_step
        model.load_state_dict(dense_state)
        cfg = base.model_copy(update={"criterion": "magnitude", **allocation_of("global-min", args.min_density),
                                      "epochs": args.dense_epochs})

        def on_round(target, m, masks, seed=seed):
            rows.append({"seed": seed, "schedule": "lottery", "method": "magnitude/global-min", "sparsity": target,
                         "acc": evaluate(m, data["x_test"], data["y_test"]), "real_sparsity": masks.sparsity()})

        lottery(model, data, cfg, list(SPARSITIES), progress=False, dense_trained=True, rewinder=rew, on_round=on_round)
        log(f"seed {seed}: lottery done ({time.perf_counter() - t_seed:.0f}s)")
    return rows


def latency(model, x, reps: int = 20) -> float:
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def effnet_part(args) -> dict:
    names, photos = sample_photos()
    dense = efficientnet_lite0()
    x1 = photos[:1]
    with torch.no_grad():
        dense_top1 = dense(photos).argmax(1)
    macs, params = count_macs(dense, x1), sum(p.numel() for p in dense.parameters())
    res = {"photos": names, "dense": {"params": params, "macs": macs, "latency_ms": 1000 * latency(dense, x1),
                                      "top1": dense_top1.tolist()}}
    res["small_ratios"] = {}
    for ratio in (0.05, 0.1):  # how fast agreement falls without any data or training
        for crit in ("magnitude", "l1"):
            m = copy.deepcopy(dense)
            prune_channels(m, x1, ratio, crit)
            with torch.no_grad():
                res["small_ratios"][f"{crit}@{ratio}"] = float((m(photos).argmax(1) == dense_top1).float().mean())
    data = load_data("fashion-mnist", args.effnet_train, args.effnet_test, 0, image_size=64, rgb=True)
    cfg = make_config(model="efficientnet-lite0", lr=0.02, batch_size=64, seed=0)
    for ratio in (0.0, 0.3, 0.5):
        m = copy.deepcopy(dense)
        entry = res["dense"] if ratio == 0.0 else {}
        if ratio > 0:
            rep = prune_channels(m, x1, ratio, "magnitude")
            macs, params = count_macs(m, x1), sum(p.numel() for p in m.parameters())
            with torch.no_grad():
                top1 = m(photos).argmax(1)
                top5 = m(photos).topk(5, 1).indices
            entry.update({"params": params, "macs": macs, "latency_ms": 1000 * latency(m, x1),
                          "top1": top1.tolist(), "agreement": float((top1 == dense_top1).float().mean()),
                          "dense_top1_in_top5": float((top5 == dense_top1[:, None]).any(1).float().mean()),
                          "verify_max_abs_diff": rep["verify_max_abs_diff"]})
            # BatchNorm statistics re-estimated on the even-numbered photos (16 random crops/flips of each), top-1
            # agreement on the odd-numbered photos, which the re-estimation never saw
            held = list(range(1, len(photos), 2))
            calib = photos[0::2]
            g = torch.Generator().manual_seed(0)
            aug = []
            for img in calib:
                for _ in range(16):
                    sc = int(torch.randint(160, 225, (1,), generator=g))
                    top, left = (int(torch.randint(0, 225 - sc, (1,), generator=g)) for _ in range(2))
                    crop = img[:, top:top + sc, left:left + sc][None]
                    crop = torch.nn.functional.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False)
                    aug.append(crop.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else crop)
            aug = torch.cat(aug)
            m3 = copy.deepcopy(m)
            recalibrate_bn(m3, {"x_train": aug, "y_train": torch.zeros(len(aug), dtype=torch.long)}, 4, 32)
            with torch.no_grad():
                entry["agreement_heldout_no_recal"] = float((m(photos[held]).argmax(1) == dense_top1[held]).float().mean())
                entry["agreement_heldout_bn_recal"] = float((m3(photos[held]).argmax(1) == dense_top1[held]).float().mean())
                entry["heldout_photos"] = [names[i] for i in held]
            for crit in ("bn-scale", "lamp"):  # other data-free group criteria: agreement only, no fine-tuning
                m2 = copy.deepcopy(dense)
                prune_channels(m2, x1, ratio, crit)
                with torch.no_grad():
                    out2 = m2(photos)
                entry[f"agreement_{crit}"] = float((out2.argmax(1) == dense_top1).float().mean())
                entry[f"dense_top1_in_top5_{crit}"] = float((out2.topk(5, 1).indices == dense_top1[:, None]).any(1).float().mean())
            log(f"lite0 {ratio:.0%}: params {params:,} latency {entry['latency_ms']:.1f} ms agreement {entry['agreement']:.2f}")
        m._fc = torch.nn.Linear(m._fc.in_features, 10)
        t = time.perf_counter()
        train_epochs(m, data, args.effnet_epochs, cfg, None, "lite0 finetune", progress=False, seed=0)
        entry["fashion_acc_no_recal"] = evaluate(m, data["x_test"], data["y_test"], batch_size=200)
        recalibrate_bn(m, data, 20, 64)  # EfficientNet's BN momentum is 0.01: re-estimate statistics on train images
        entry["fashion_acc"] = evaluate(m, data["x_test"], data["y_test"], batch_size=200)
        entry["finetune_s"] = time.perf_counter() - t
        log(f"lite0 {ratio:.0%}: fashion-mnist after fine-tuning {entry['fashion_acc']:.4f} ({entry['finetune_s']:.0f}s)")
        if ratio > 0:
            res[f"pruned_{int(ratio * 100)}"] = entry
    return res


def summarize(rows: list[dict]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["schedule"], r["method"]), {}).setdefault(r["sparsity"], []).append(r["acc"])
    return groups


def write(rows, eff, args, times):
    RESULTS.mkdir(parents=True, exist_ok=True)
    groups = summarize(rows)
    dense = groups.pop(("dense", "dense"), {}).get(0.0, [float("nan")])
    base_cmd = "flock /tmp/prunekit-cpu.lock nice -n 10 .venv/bin/python benchmarks/vision_pruning.py"
    cmd = f"Command: `{(base_cmd + ' ' + args.command).strip()}`"
    if getattr(args, "fashion_command", None) is not None:
        cmd += (f" (EfficientNet part); Fashion-MNIST rows from the earlier run "
                f"`{(base_cmd + ' ' + args.fashion_command).strip()}`")
    lines = ["# Vision pruning benchmark (issue 6)", "", cmd, "",
             f"Machine: {platform.processor() or platform.machine()}, shared 2-core CPU, torch {torch.__version__}, "
             f"1 thread; Fashion-MNIST part {times['fashion_s'] / 60:.1f} min, EfficientNet part "
             f"{times['effnet_s'] / 60:.1f} min.", "",
             f"Fashion-MNIST, SmallCNN width 8 (105,970 parameters), {args.train_subset} training images, "
             f"{args.test_subset} test images, {args.seeds} seeds; dense {args.dense_epochs} epochs, fine-tune "
             f"{args.finetune_epochs}; Global MP minimum density {args.min_density}. Test accuracy, mean ± std over seeds.",
             "", f"Dense: {statistics.mean(dense):.4f} ± {statistics.pstdev(dense) if len(dense) > 1 else 0:.4f}", "",
             "| schedule | criterion/allocation | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
             "|---|---|" + "---|" * len(SPARSITIES)]
    for (sched, meth), by in groups.items():
        cells = []
        for s in SPARSITIES:
            v = by.get(s, [])
            cells.append(f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}" if v else "-")
        lines.append(f"| {sched} | {meth} | " + " | ".join(cells) + " |")
    lines += ["", f"Training budgets (epochs over the {args.train_subset} images): dense {args.dense_epochs}; oneshot = the "
              f"dense model + {args.finetune_epochs} fine-tune; at-init, gradual and scratch "
              f"{args.dense_epochs + args.finetune_epochs} from initialization; lottery round r (r = 1..5 for 50..98%) "
              f"retrains {args.dense_epochs} epochs from the weights rewound to iteration {args.rewind_step}, after r - 1 "
              f"earlier rounds: NOT compute-matched, the 98% ticket cost {args.dense_epochs * 6} epochs in all. The dense "
              f"model is short-trained ({args.dense_epochs} epochs), so at 50% several schedules beat it."]
    # collapse check at 98%
    lines += ["", "Layer collapse at 98% (oneshot magnitude, before fine-tuning):", ""]
    for meth in ("magnitude/global", "magnitude/global-min", "magnitude/lamp", "magnitude/uniform"):
        rs = [r for r in rows if r["schedule"] == "oneshot" and r["method"] == meth and r["sparsity"] == 0.98]
        if rs:
            lines.append(f"- {meth}: min layer density {min(r['min_layer_density'] for r in rs):.4f}, emptied layers "
                         f"{sorted({x for r in rs for x in r['empty_layers']}) or 'none'}, accuracy right after pruning "
                         f"{statistics.mean(r['acc_before_finetune'] for r in rs):.4f}, after fine-tuning "
                         f"{statistics.mean(r['acc'] for r in rs):.4f}")
    if eff:
        lines += ["", "## EfficientNet-Lite0 channel pruning (real ImageNet weights)", "",
                  f"Photos: {', '.join(eff['photos'])} (skimage.data). Latency: one 224x224 image, 1 thread, median of 20.",
                  f"Fashion-MNIST fine-tuning: new 10-way head, {args.effnet_train} images at 64x64 RGB, "
                  f"{args.effnet_epochs} epoch(s), SGD lr 0.02 batch 64, then BatchNorm statistics re-estimated on 20 "
                  f"training batches (accuracy without that step in the JSON); {args.effnet_test} test images.", "",
                  "| model | params | MACs (224) | latency ms | top-1 agreement with dense | dense top-1 in top-5 | "
                  "Fashion-MNIST acc after fine-tune |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("dense", "pruned_30", "pruned_50"):
            e = eff.get(k)
            if e:
                lines.append(f"| {k} (group L2) | {e['params']:,} | {e['macs'] / 1e6:.0f}M | {e['latency_ms']:.1f} | "
                             f"{e.get('agreement', 1.0):.2f} | {e.get('dense_top1_in_top5', 1.0):.2f} | "
                             f"{e.get('fashion_acc', float('nan')):.4f} |")
        if eff.get("small_ratios"):
            lines += ["", "Top-1 agreement on the photos at smaller ratios (no data, no training): " +
                      ", ".join(f"{k.split('@')[0]} {float(k.split('@')[1]):.0%}: {v:.2f}" for k, v in eff["small_ratios"].items()), ""]
            lines.append("| model | params | MACs (224) | latency ms | top-1 agreement with dense | dense top-1 in top-5 | "
                         "Fashion-MNIST acc after fine-tune |")
            lines.append("|---|---|---|---|---|---|---|")
        for k in ("pruned_30", "pruned_50"):
            e = eff.get(k)
            if e and "agreement_heldout_bn_recal" in e:
                lines.append(f"| {k} (group L2) + BN statistics from the other photos | same | same | same | "
                             f"{e['agreement_heldout_bn_recal']:.2f} on {len(e['heldout_photos'])} held-out photos "
                             f"(without: {e['agreement_heldout_no_recal']:.2f}) | - | - |")
            for crit in ("bn-scale", "lamp"):
                if e and f"agreement_{crit}" in e:
                    lines.append(f"| {k} ({crit}) | same | same | same | {e[f'agreement_{crit}']:.2f} | "
                                 f"{e[f'dense_top1_in_top5_{crit}']:.2f} | - |")
    (RESULTS / "vision_pruning.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "vision_pruning.json").write_text(json.dumps({"args": vars(args), "times": times, "rows": rows,
                                                             "efficientnet_lite0": eff}, indent=1, default=float))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    xs = list(range(len(SPARSITIES)))
    for i, ((sched, meth), by) in enumerate(groups.items()):
        m = [statistics.mean(by[s]) if s in by else float("nan") for s in SPARSITIES]
        e = [statistics.pstdev(by[s]) if s in by else 0 for s in SPARSITIES]
        ax.errorbar(xs, m, yerr=e, marker="os^Dv<>ph*XP"[i % 12], capsize=3, label=f"{sched}: {meth}",
                    linestyle="-" if sched == "oneshot" else "--", color=plt.get_cmap("tab20")(i % 20))
    ax.axhline(statistics.mean(dense), color="k", linewidth=0.8, label="dense")
    ax.set_xticks(xs, [f"{s:.0%}" for s in SPARSITIES])
    ax.set_xlabel("sparsity of conv/linear weights")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title(f"SmallCNN-8, {args.train_subset} train images, {args.seeds} seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "vision_pruning.png", dpi=110)
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--test-subset", type=int, default=5000)
    ap.add_argument("--dense-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--rewind-step", type=int, default=20)
    ap.add_argument("--min-density", type=float, default=0.01)
    ap.add_argument("--effnet-train", type=int, default=2000)
    ap.add_argument("--effnet-test", type=int, default=2000)
    ap.add_argument("--effnet-epochs", type=int, default=1)
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--skip-effnet", action="store_true")
    ap.add_argument("--reuse-fashion", action="store_true", help="with --skip-fashion: keep the Fashion-MNIST rows "
                    "of the last results JSON and redo only the EfficientNet part")
    args = ap.parse_args()
    args.command = " ".join(sys.argv[1:])
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    eff = None if args.skip_effnet else effnet_part(args)
    times = {"effnet_s": time.perf_counter() - t0}
    prev = RESULTS / "vision_pruning.json"
    if args.skip_fashion and args.reuse_fashion and prev.is_file():  # rerun only the EfficientNet part
        old = json.loads(prev.read_text())
        rows = old["rows"]
        args.fashion_command = old.get("args", {}).get("command", "")
        for k in ("seeds", "train_subset", "test_subset", "dense_epochs", "finetune_epochs", "rewind_step", "min_density"):
            setattr(args, k, old["args"][k])
        if "times" in old:
            times["fashion_s"] = old["times"]["fashion_s"]
        else:  # first version of this script: total minus its EfficientNet fine-tuning time
            times["fashion_s"] = old["seconds"] - sum(e.get("finetune_s", 0) for e in old["efficientnet_lite0"].values()
                                                      if isinstance(e, dict))
    else:
        t1 = time.perf_counter()
        rows = [] if args.skip_fashion else fashion_part(args)
        times["fashion_s"] = time.perf_counter() - t1
    write(rows, eff, args, times)


if __name__ == "__main__":
    main()
