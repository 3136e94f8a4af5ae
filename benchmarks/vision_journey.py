"""Journey Matters on the vision benchmark (issue 19): do training runs with the same *average* parameter count
reach the same loss, whatever their schedule and final count? (Jin et al., "Journey Matters: Average Parameter
Count over Pre-training Unifies Sparse and Dense Scaling Laws", ICLR 2025.)

    flock /tmp/prunekit-cpu.lock nice -n 10 .venv/bin/python benchmarks/vision_journey.py
    .venv/bin/python benchmarks/vision_journey.py --quick      # smoke run: tiny settings, results to a temp dir

Writes benchmarks/results/vision_journey.{json,md,png}. What runs, exactly:

* Fashion-MNIST, prunekit's SmallCNN (the vision benchmark's network; width 8 = 105,970 parameters, of which
  105,736 conv/linear weights are prunable), a random ``--train-subset`` of the training images (new subset per
  seed), the first ``--test-subset`` test images; SGD + Nesterov, batch 128, lr 0.05 with ONE cosine over all
  ``--epochs`` epochs (no phase restarts), wd 5e-4, 1 thread. Every run takes the same number of steps T.
* Two budgets of average parameters, each the size of a narrower dense SmallCNN (width 6 and width 2 unless
  ``--budgets`` says other widths), and in
  each budget four runs with that same average but different journeys:
    - ``dense``:   the narrower SmallCNN, dense all along (average = final);
    - ``at-init``: the width-8 net with a fixed random ERK mask from step 0 (average = final, sparse);
    - ``oneshot``: the width-8 net dense until a fraction of T, then magnitude-pruned once (global, per-layer
      floor ``--min-density``) and trained on with the mask (final below the average);
    - ``gradual``: the width-8 net pruned by Zhu & Gupta's cubic ramp over a window of T, every ``--prune-every``
      steps (the paper's schedule; final far below the average).
  Each sparse run's target sparsity is solved (bisection) so that its planned average over T steps equals the
  budget; the average actually recorded (``core.journey.Journey`` through ``train_epochs(journey=...)``, the same
  accounting as ``prunekit train-prune``) is reported beside it. Plus the dense width-8 net as the reference.
* After training: cross-entropy on the whole training subset and on the test images (eval mode), test accuracy.

The check (per metric; the test loss is the headline, the paper compares validation loss): the tolerance is two
standard errors of a difference of two k-seed means, 2 * sigma * sqrt(2 / k), with sigma the per-seed standard
deviation pooled over all configurations. "Reproduced" when in each budget every pair of runs differs by at most
the tolerance AND the two budgets differ by more than it (the loss does depend on size at this training length);
otherwise "not reproduced", with the numbers. Also given: pairs with about the same FINAL count but different
averages (the contrast: they should differ), and how well log(average) vs log(final) parameters explain the loss.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from prunekit.core.journey import Journey  # noqa: E402
from prunekit.core.masks import Masks, kept_total, prunable  # noqa: E402
from prunekit.vision.schedules import Gradual, OneShot, pruner  # noqa: E402
from prunekit.vision.train import load_data, make_config, train_epochs  # noqa: E402
from prunekit.zoo.nets import SmallCNN  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WIDE = 8
# budget name -> the dense width whose size is the budget; each sparse schedule: (kind, window as fractions of T)
# (--budgets sets them: the larger budget's sparse runs use the first windows, the smaller one's the second: a
# smaller budget needs the pruning to start earlier for the average to be reachable)
BUDGETS = {"w5": 5, "w3": 3}
WINDOWS = ((("at-init", (0.0, 0.0)), ("oneshot", (0.25, 0.25)), ("gradual", (0.25, 0.75))),
           (("at-init", (0.0, 0.0)), ("oneshot", (0.10, 0.10)), ("gradual", (0.10, 0.60))))
SPARSE = dict(zip(BUDGETS, WINDOWS))


def set_budgets(widths: list[int]) -> None:
    """The two budgets: the sizes of the dense SmallCNNs of these widths (larger first)."""
    widths = sorted(widths, reverse=True)
    if len(widths) != 2 or len(set(widths)) != 2 or widths[0] >= WIDE or widths[1] < 1:
        raise ValueError(f"--budgets takes two different widths between 1 and {WIDE - 1}, got {widths}.")
    BUDGETS.clear()
    BUDGETS.update({f"w{w}": w for w in widths})
    SPARSE.clear()
    SPARSE.update(zip(BUDGETS, WINDOWS))
MAX_SPARSITY = 0.97
METRICS = (("test_loss", "test loss"), ("train_loss", "training loss"), ("test_acc", "test accuracy"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sizes(width: int) -> tuple[int, int]:
    """(all parameters, prunable conv/linear weights) of SmallCNN at ``width``."""
    m = SmallCNN(10, width)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in prunable(m).values())


def make_schedule(kind: str, window: tuple[float, float], sparsity: float, steps: int, prune, every: int):
    start = int(window[0] * steps)
    if kind in ("at-init", "oneshot"):
        return OneShot(prune, sparsity, at=start)
    end = max(start + 1, int(window[1] * steps))
    return Gradual(prune, sparsity, start, end, every)


class _Stub(nn.Module):
    """A model of ``n`` parameters for planning a schedule's journey without training."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n), requires_grad=False)


def planned(kind: str, window, sparsity: float, steps: int, n: int, p: int, every: int) -> tuple[float, int]:
    """(average, final) live parameters of the schedule over ``steps`` steps, from the schedule object itself with
    masks of the exact counts (every allocation keeps round((1 - s) * P))."""
    stub = _Stub(n)

    def prune(model, s, masks=None):
        return Masks({"w": torch.arange(p) < kept_total(p, s)})

    sched = make_schedule(kind, window, sparsity, steps, prune, every)
    j = Journey()
    step = j.tracking(stub, None, lambda t: sched.on_step(t, stub))
    for t in range(steps):
        step(t)
    return j.average, j.last


def solve_sparsity(kind, window, target: float, steps, n, p, every) -> float:
    """The sparsity whose planned average is ``target`` (bisection; capped at MAX_SPARSITY)."""
    if planned(kind, window, MAX_SPARSITY, steps, n, p, every)[0] > target:
        return MAX_SPARSITY
    lo, hi = 0.0, MAX_SPARSITY
    for _ in range(40):
        mid = (lo + hi) / 2
        if planned(kind, window, mid, steps, n, p, every)[0] > target:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, ok = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += float(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
        ok += int((out.argmax(1) == y[i:i + batch]).sum())
    return loss / len(y), ok / len(y)


def plan(args) -> list[dict]:
    """Every configuration: label, budget, width, schedule kind, window, sparsity, planned average and final."""
    steps = args.epochs * math.ceil(args.train_subset / args.batch_size)
    n8, p8 = sizes(WIDE)
    configs = [{"label": f"dense w{WIDE}", "budget": "reference", "width": WIDE, "kind": "dense", "window": None,
                "sparsity": 0.0, "planned_avg": float(n8), "planned_final": n8}]
    for budget, width in BUDGETS.items():
        target = sizes(width)[0]
        configs.append({"label": f"dense w{width}", "budget": budget, "width": width, "kind": "dense",
                        "window": None, "sparsity": 0.0, "planned_avg": float(target), "planned_final": target})
        for kind, window in SPARSE[budget]:
            s = solve_sparsity(kind, window, target, steps, n8, p8, args.prune_every)
            avg, final = planned(kind, window, s, steps, n8, p8, args.prune_every)
            where = {"at-init": "", "oneshot": f" @{window[0]:.0%}",
                     "gradual": f" {window[0]:.0%}-{window[1]:.0%}"}[kind]
            configs.append({"label": f"{kind}{where} w{WIDE} s{s:.3f}", "budget": budget, "width": WIDE,
                            "kind": kind, "window": list(window), "sparsity": s, "planned_avg": avg,
                            "planned_final": final, "budget_params": target})
    return configs


def run_one(cfg_row: dict, seed: int, data: dict, args, steps: int) -> dict:
    cfg = make_config(model="cnn", batch_size=args.batch_size, lr=0.05, seed=seed)
    torch.manual_seed(seed)
    model = SmallCNN(10, cfg_row["width"])
    on_step = None
    sched = None
    if cfg_row["kind"] != "dense":
        if cfg_row["kind"] == "at-init":
            prune = pruner("random", "erk", seed=seed)
        else:
            prune = pruner("magnitude", "global", min_density=args.min_density)
        sched = make_schedule(cfg_row["kind"], cfg_row["window"], cfg_row["sparsity"], steps, prune, args.prune_every)

        def on_step(t):
            return sched.on_step(t, model)

    j = Journey()
    t0 = time.perf_counter()
    train_epochs(model, data, args.epochs, cfg, None, cfg_row["label"], on_step=on_step, progress=False, seed=seed,
                 journey=j)
    seconds = time.perf_counter() - t0
    train_loss, train_acc = loss_acc(model, data["x_train"], data["y_train"])
    test_loss, test_acc = loss_acc(model, data["x_test"], data["y_test"])
    js = j.summary()
    return {"label": cfg_row["label"], "budget": cfg_row["budget"], "kind": cfg_row["kind"], "seed": seed,
            "average_params": js["average_params"], "final_params": js["final_params"], "steps": js["steps"],
            "mask_events": len(sched.log) if sched is not None else 0,
            "final_sparsity": sched.masks.sparsity() if sched is not None and sched.masks is not None else 0.0,
            "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "seconds": seconds, "curve": js["curve"]}


# ---------------------------------------------------------------------------------------------- the analysis


def _r2(xs: list[float], ys: list[float]) -> float:
    """R^2 of the least-squares line ys ~ a + b * xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return float("nan")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy * sxy / (sxx * syy)


def analyse(configs: list[dict], rows: list[dict], seeds: int) -> dict:
    by = {c["label"]: [r for r in rows if r["label"] == c["label"]] for c in configs}
    table = []
    for c in configs:
        rs = by[c["label"]]
        entry = {**{k: c[k] for k in ("label", "budget", "kind", "sparsity", "planned_avg", "planned_final")},
                 "average_params": statistics.fmean(r["average_params"] for r in rs),
                 "final_params": statistics.fmean(r["final_params"] for r in rs)}
        for m, _ in METRICS:
            vals = [r[m] for r in rs]
            entry[m] = statistics.fmean(vals)
            entry[f"{m}_sd"] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            entry[f"{m}_seeds"] = vals
        table.append(entry)
    checks = {}
    for m, name in METRICS:
        variances = [statistics.variance(e[f"{m}_seeds"]) for e in table if len(e[f"{m}_seeds"]) > 1]
        sigma = math.sqrt(statistics.fmean(variances)) if variances else float("nan")
        tol = 2.0 * sigma * math.sqrt(2.0 / seeds)
        groups = {}
        for b in BUDGETS:
            members = [e for e in table if e["budget"] == b]
            pairs = [(a["label"], c["label"], abs(a[m] - c[m])) for a, c in itertools.combinations(members, 2)]
            worst = max(pairs, key=lambda x: x[2])
            groups[b] = {"budget_params": sizes(BUDGETS[b])[0],
                         "averages": [e["average_params"] for e in members],
                         "finals": [e["final_params"] for e in members],
                         "values": {e["label"]: e[m] for e in members},
                         "max_pair_delta": worst[2], "worst_pair": worst[:2], "within": worst[2] <= tol}
        means = {b: statistics.fmean(g["values"].values()) for b, g in groups.items()}
        big, small = BUDGETS
        separation = abs(means[big] - means[small])
        contrast = []  # about the same final count (within 10%), averages 25% or more apart
        for a, c in itertools.combinations([e for e in table if e["budget"] != "reference"], 2):
            fa, fc, aa, ac = a["final_params"], c["final_params"], a["average_params"], c["average_params"]
            if a["budget"] != c["budget"] and abs(fa - fc) <= 0.1 * max(fa, fc) and abs(aa - ac) >= 0.25 * max(aa, ac):
                contrast.append({"pair": [a["label"], c["label"]], "finals": [a["final_params"], c["final_params"]],
                                 "averages": [a["average_params"], c["average_params"]],
                                 "delta": abs(a[m] - c[m]), "beyond_tolerance": abs(a[m] - c[m]) > tol})
        xs_avg = [math.log(e["average_params"]) for e in table]
        xs_fin = [math.log(max(1.0, e["final_params"])) for e in table]
        ys = [e[m] for e in table]
        reproduced = all(g["within"] for g in groups.values()) and separation > tol
        checks[m] = {"name": name, "sigma_per_seed": sigma, "tolerance": tol, "groups": groups,
                     "budget_means": means, "separation": separation, "contrast": contrast,
                     "r2_log_average": _r2(xs_avg, ys), "r2_log_final": _r2(xs_fin, ys),
                     "verdict": "reproduced" if reproduced else "not reproduced"}
    return {"table": table, "checks": checks}


# ------------------------------------------------------------------------------------------------- writing


def markdown(args, configs, res, times) -> str:
    steps = args.epochs * math.ceil(args.train_subset / args.batch_size)
    n8, p8 = sizes(WIDE)
    lines = ["# Journey Matters on the vision benchmark (issue 19)", "",
             f"Command: `{('.venv/bin/python benchmarks/vision_journey.py ' + args.command).strip()}`", "",
             f"Machine: {machine()}; {times['total_s'] / 60:.1f} min in all.", "",
             f"Fashion-MNIST, SmallCNN (width {WIDE}: {n8:,} parameters, {p8:,} prunable), {args.train_subset} "
             f"training images (a new random subset per seed), {args.test_subset} test images, {args.seeds} seeds. "
             f"Every run: {args.epochs} epochs = {steps} optimizer steps, batch {args.batch_size}, SGD + Nesterov, "
             f"lr 0.05 with one cosine over all steps, wd 5e-4. Sparse runs are the width-{WIDE} net: at-init = random "
             f"ERK mask from step 0; oneshot = global magnitude (per-layer floor {args.min_density}) once at the "
             f"given fraction of training; gradual = Zhu & Gupta's cubic ramp over the given window, masks every "
             f"{args.prune_every} steps. Their sparsities were solved so that the average live-parameter count "
             "over training equals the size of the dense narrower net of their budget. Average and final "
             "parameters are the recorded journey (`core.journey.Journey`), means over seeds; losses are "
             "cross-entropy in eval mode on the whole training subset and on the test images (mean ± sd over seeds).",
             "", "| budget | run | sparsity | average params | final params | training loss | test loss | "
             "test accuracy |", "|---|---|---|---|---|---|---|---|"]
    for e in res["table"]:
        lines.append(f"| {e['budget']} | {e['label']} | {e['sparsity']:.3f} | {e['average_params']:,.0f} | "
                     f"{e['final_params']:,.0f} | {e['train_loss']:.4f} ± {e['train_loss_sd']:.4f} | "
                     f"{e['test_loss']:.4f} ± {e['test_loss_sd']:.4f} | "
                     f"{e['test_acc']:.4f} ± {e['test_acc_sd']:.4f} |")
    lines += ["", "## The check", "",
              f"Criterion: the tolerance is two standard errors of a difference of two {args.seeds}-seed means, "
              f"2·σ·√(2/{args.seeds}), σ the per-seed standard deviation pooled over all {len(configs)} "
              "configurations. The claim is **reproduced** for a metric when, in each budget, every pair of runs "
              "(same average, different journeys and final counts) differs by at most the tolerance, and the two "
              "budgets differ by more than it (otherwise size would not matter at this training length and the "
              "test says nothing).", ""]
    for m, name in METRICS:
        c = res["checks"][m]
        lines.append(f"**{name}: {c['verdict']}.** σ = {c['sigma_per_seed']:.4f}, tolerance {c['tolerance']:.4f}.")
        for b, g in c["groups"].items():
            lines.append(f"- budget {b} ({g['budget_params']:,} parameters; recorded averages "
                         f"{min(g['averages']):,.0f}-{max(g['averages']):,.0f}, finals {min(g['finals']):,.0f}-"
                         f"{max(g['finals']):,.0f}): largest difference {g['max_pair_delta']:.4f} "
                         f"({g['worst_pair'][0]} vs {g['worst_pair'][1]}), "
                         f"{'within' if g['within'] else 'OUTSIDE'} the tolerance.")
        lines.append(f"- the budgets' means differ by {c['separation']:.4f} "
                     f"({'more' if c['separation'] > c['tolerance'] else 'not more'} than the tolerance).")
        for k in c["contrast"]:
            lines.append(f"- same final count, different averages: {k['pair'][0]} (average {k['averages'][0]:,.0f}, "
                         f"final {k['finals'][0]:,.0f}) vs {k['pair'][1]} (average {k['averages'][1]:,.0f}, final "
                         f"{k['finals'][1]:,.0f}): difference {k['delta']:.4f}"
                         f" ({'beyond' if k['beyond_tolerance'] else 'within'} the tolerance).")
        lines.append(f"- R² of a line over the {len(configs)} configurations: vs log(average parameters) "
                     f"{c['r2_log_average']:.3f}, vs log(final parameters) {c['r2_log_final']:.3f}.")
        lines.append("")
    lines += ["Not in the grid: lottery tickets. Their rounds rewind and retrain, so a fixed-step comparison would "
              "give the final ticket only one round of training; `prunekit train-prune --schedule lottery` records "
              "their journey (every round's steps) like every other schedule."]
    return "\n".join(lines) + "\n"


def plot(res, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2), sharey="row")
    colors = {"reference": "0.3", **dict(zip(BUDGETS, ("C0", "C3")))}
    markers = {"dense": "o", "at-init": "s", "oneshot": "^", "gradual": "D"}
    for row, (m, name) in enumerate(METRICS[:2]):
        for col, (key, xlabel) in enumerate((("average_params", "average parameters over training"),
                                             ("final_params", "final parameters"))):
            ax = axes[row][col]
            for e in res["table"]:
                dodge = 1.0 + 0.012 * (list(markers).index(e["kind"]) - 1.5)  # equal x side by side, not on top
                ax.errorbar(e[key] * dodge, e[m], yerr=e[f"{m}_sd"] if math.isfinite(e[f"{m}_sd"]) else None,
                            fmt=markers[e["kind"]], color=colors[e["budget"]], capsize=3, ms=7,
                            label=f"{e['budget']}: {e['kind']}")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(seen.values(), seen.keys(), fontsize=7, loc="lower center", ncol=5, frameon=False)
    verdict = res["checks"]["test_loss"]["verdict"]
    fig.suptitle(f"SmallCNN on Fashion-MNIST, {args.seeds} seeds: equal average parameters -> equal loss? "
                 f"(test loss: {verdict})", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-subset", type=int, default=60000)
    ap.add_argument("--test-subset", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--prune-every", type=int, default=10)
    ap.add_argument("--min-density", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budgets", default="6,2", help="two SmallCNN widths below 8 whose dense sizes are the two "
                    "budgets of average parameters (default 6,2: at 5,3 on 10,000 images the budgets differed by less "
                    "than the seed noise)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 512 images, 2 epochs, masks every step; "
                    "writes to a temporary directory, not benchmarks/results")
    args = ap.parse_args()
    args.command = " ".join(sys.argv[1:])
    if args.quick:
        args.train_subset, args.test_subset, args.epochs, args.prune_every = 512, 256, 2, 1
    if args.seeds < 2:
        ap.error("the check needs at least 2 seeds (the seed spread)")
    try:
        set_budgets([int(w) for w in args.budgets.split(",")])
    except ValueError as e:
        ap.error(str(e) if "--budgets" in str(e) else f"--budgets takes two integers like 5,3, got {args.budgets!r}.")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    steps = args.epochs * math.ceil(args.train_subset / args.batch_size)
    configs = plan(args)
    for c in configs:
        log(f"plan: {c['label']:32s} average {c['planned_avg']:>10,.0f}  final {c['planned_final']:>8,}")
    rows = []
    for seed in range(args.seeds):
        data = load_data("fashion-mnist", args.train_subset, args.test_subset, seed)
        for c in configs:
            r = run_one(c, seed, data, args, steps)
            rows.append(r)
            log(f"seed {seed} {c['label']:32s} average {r['average_params']:>10,.0f} final {r['final_params']:>8,} "
                f"test loss {r['test_loss']:.4f} acc {r['test_acc']:.4f} ({r['seconds']:.0f}s, "
                f"{time.perf_counter() - t0:.0f}s in all)")
    res = analyse(configs, rows, args.seeds)
    times = {"total_s": time.perf_counter() - t0}
    out = Path(tempfile.mkdtemp(prefix="vision_journey_")) if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(args, configs, res, times)
    (out / "vision_journey.md").write_text(md)
    (out / "vision_journey.json").write_text(json.dumps({"args": vars(args), "machine": machine(), "times": times,
                                                         "configs": configs, "rows": rows, **res},
                                                        indent=1, default=float))
    plot(res, out / "vision_journey.png", args)
    print(md)
    log(f"wrote {out}/vision_journey.{{md,json,png}}")


if __name__ == "__main__":
    main()
