"""Data pruning on Fashion-MNIST: test accuracy vs kept fraction for every score x selection, 3 seeds, with and
without distillation, plus the time to score the 60k training images.

    flock /tmp/prunekit-cpu.lock nice -n 10 .venv/bin/python benchmarks/data_pruning.py

What runs (one CPU thread; the numbers in the README came from this exact command):
1. Every score on all 60,000 training images (timed): el2n / grand / entropy = 3 runs x 2 epochs; forgetting /
   aum = 3 runs x 6 epochs; prototype = pixel-PCA(64) embeddings + k-means (k=10; k=100 for dbp/semdedup);
   the small CNN (width 8) for all training. EfficientNet-Lite0 embedding is timed on 1,000 images.
2. The pruning grid runs on a fixed stratified pool of 10,000 training images (seed 0) to fit the machine; the
   pool's scores are the 60k scores restricted to it. Subsets keep 10/30/50/70/90% of the pool; each is
   trained for the same 300 steps of 128 (the full pool: 3.8 epochs; CCS and the distillation paper also fix
   the iterations, so that small subsets are not simply under-trained) and tested on the 10,000 test images.
   Seeds 0, 1, 2 (selection and training). "easiest" only for el2n, forgetting and prototype. CCS: 50 strata,
   hard cutoff beta = 0.3 at 10% kept (the CCS repository's CIFAR-10 setting at 90% pruning), 0.1 at 30%,
   0 above. Distillation: a teacher per seed trained 1,500 steps on the whole pool, T = 4, alpha = 0.9; for random, dbp, semdedup and
   the hardest/ccs selections of el2n, forgetting and prototype (grand, aum, entropy without, to fit the budget).
   Scores are cached in /tmp/prunekit-dp-cache (delete it to re-time the scoring).
Writes benchmarks/results/data_pruning.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prunekit.data import ScoreConfig, load_dataset, score, select
from prunekit.data.train import TrainConfig, accuracy, features, fit, predict

RESULTS = Path(__file__).parent / "results"
SCORES = ["el2n", "grand", "forgetting", "aum", "entropy", "prototype"]
FRACTIONS = [0.1, 0.3, 0.5, 0.7, 0.9]
# CCS hard cutoff beta per kept fraction: the CCS repository runs CIFAR-10 at 90% pruning with --mis-ratio 0.3;
# smaller cutoffs at lower pruning rates (none from 50% kept up), 50 strata
CCS_BETA = {0.1: 0.3, 0.3: 0.1}
# with --deadline (a shared machine, a session that ends): a seed is only started if it can end before that UTC
# time; fewer seeds are then reported as such
SEED_MINUTES = 5.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not for reporting)")
    ap.add_argument("--only", default=None, help="re-run some rows: comma-separated score/strategy pairs, e.g. "
                    "random/random,el2n/ccs (written to results/data_pruning_rows.*)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--deadline", default=None, help="UTC time YYYY-MM-DDTHH:MM after which no seed starts")
    args = ap.parse_args()
    deadline = None
    if args.deadline:
        import calendar

        deadline = calendar.timegm(time.strptime(args.deadline, "%Y-%m-%dT%H:%M"))
    torch.set_num_threads(1)
    quick = args.quick
    pool_n, steps, t_steps = (500, 20, 40) if quick else (10000, 300, 1500)
    seeds = [0] if quick else [0, 1, 2]
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
    only = None if args.only is None else [tuple(x.split("/")) for x in args.only.split(",")]
    fractions = [0.1, 0.5] if quick else FRACTIONS
    width = 8
    out_stem = RESULTS / ("data_pruning_quick" if quick else "data_pruning_rows" if only else "data_pruning")
    RESULTS.mkdir(exist_ok=True)
    t_start = time.perf_counter()

    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    if quick:
        sub = np.random.default_rng(0).permutation(len(train))[:1500]
        train = train.subset(np.sort(sub))
    n = len(train)
    # ---- 1. score all training images
    scfg = dict(width=width, seeds=1 if quick else 3)
    timings, values = {}, {}
    from prunekit.data import load_scores, save_scores

    cache = Path(os.environ.get("PRUNEKIT_DP_CACHE", "/tmp/prunekit-dp-cache")) / ("quick" if quick else "full")
    cache.mkdir(parents=True, exist_ok=True)
    wanted = None if only is None else {sc.replace("-k100", "_k100") for sc, _ in only} | {"random", "prototype_k100"}
    for name, cfg in [(nm, ScoreConfig(**scfg, encoder="pca", clusters=10)) for nm in ["random"] + SCORES] + \
            [("prototype_k100", ScoreConfig(encoder="pca", clusters=100))]:
        if wanted is not None and name not in wanted:
            continue
        f = cache / f"{name}.parquet"
        if not f.exists():  # scores are cached (they are the slow, seed-independent part); timings travel with them
            t0 = time.perf_counter()
            res = score(train, name.split("_")[0], cfg, progress=True)
            save_scores(f, train, res, cfg=cfg.to_dict(), seconds=time.perf_counter() - t0)
        cols, meta = load_scores(f)
        timings[name] = meta["timings"]["seconds"]
        values[name] = cols
        print(f"score {name}: {timings[name]:.1f}s for {n:,} images ({meta['info']})", flush=True)
    proto100 = values.pop("prototype_k100")
    values = {k: v["score"] for k, v in values.items()}
    from prunekit.data.embed import embed, has_efficientnet

    if has_efficientnet():
        m = 20 if quick else 1000
        t0 = time.perf_counter()
        embed(train.subset(np.arange(m)), "efficientnet-lite0", image_size=64)
        timings["efficientnet_lite0_embed_per_1000"] = (time.perf_counter() - t0) * 1000 / m
        print(f"efficientnet-lite0 embedding (64 px): {timings['efficientnet_lite0_embed_per_1000']:.1f}s per 1000 images", flush=True)

    # ---- 2. the pool and the grid
    from sklearn.model_selection import train_test_split

    pool, _ = train_test_split(np.arange(n), train_size=pool_n, random_state=0, stratify=train.y)
    pool = np.sort(pool)
    x_all = features(train)
    x_pool, y_pool = x_all[pool], torch.from_numpy(train.y[pool])
    x_te, y_te = features(test), torch.from_numpy(test.y)
    stats_from = x_pool
    pscores = {k: v[pool] for k, v in values.items()}
    emb, clus = proto100["embedding"][pool], proto100["cluster"][pool]
    pdist = proto100["score"][pool]

    combos = [("random", "random")] + [(s, st) for s in SCORES for st in ("hardest", "easiest", "ccs")
                                       if st != "easiest" or s in ("el2n", "forgetting", "prototype")] + \
             [("prototype-k100", "dbp"), ("prototype-k100", "semdedup")]
    if only is not None:
        unknown = [c for c in only if c not in combos]
        if unknown:
            raise SystemExit(f"--only: {unknown[0]} is not a row of the grid")
        combos = only
    runs = []

    def tcfg(seed, st):
        return TrainConfig(model="fast-cnn", steps=st, width=width, seed=seed)

    def save():
        blob = {"command": "flock /tmp/prunekit-cpu.lock nice -n 10 .venv/bin/python benchmarks/data_pruning.py"
                + (" --quick" if quick else ""), "pool": int(pool_n), "train_images": n, "steps": steps,
                "teacher_steps": t_steps, "batch_size": 128, "seeds_planned": seeds, "width": width, "seeds": done_seeds, "fractions": fractions,
                "score_seconds": timings, "runs": runs, "threads": 1, "cpu_count": os.cpu_count(),
                "total_seconds": time.perf_counter() - t_start}
        tmp = out_stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(blob, indent=1))
        os.replace(tmp, out_stem.with_suffix(".json"))

    done_seeds = []
    for seed in seeds:
        if deadline is not None and time.time() + SEED_MINUTES * 60 > deadline:
            print(f"stopping before seed {seed}: it would end after the session's deadline", flush=True)
            break
        done_seeds.append(seed)
        t0 = time.perf_counter()
        full = fit(x_pool, y_pool, 10, tcfg(seed, steps), stats_from=stats_from)
        runs.append(dict(score="full", strategy="full", fraction=1.0, seed=seed, distill=False, kept=int(pool_n),
                         acc=accuracy(full, x_te, y_te), seconds=time.perf_counter() - t0))
        teacher = fit(x_pool, y_pool, 10, tcfg(seed, t_steps), stats_from=stats_from)
        t_logits = predict(teacher, x_pool)
        runs.append(dict(score="teacher", strategy="full", fraction=1.0, seed=seed, distill=False, kept=int(pool_n),
                         acc=accuracy(teacher, x_te, y_te), seconds=time.perf_counter() - t0))
        print(f"seed {seed}: full pool {runs[-2]['acc']:.4f}, teacher ({t_steps} steps) {runs[-1]['acc']:.4f}", flush=True)
        for sname, strat in combos:
            for frac in fractions:
                if strat == "dbp":
                    keep = select(pdist, frac, "dbp", embeddings=emb, clusters=clus, seed=seed)
                elif strat == "semdedup":
                    keep = select(pdist, frac, "semdedup", embeddings=emb, clusters=clus, seed=seed)
                else:
                    beta = CCS_BETA.get(frac, 0.0) if strat == "ccs" else 0.0
                    keep = select(pscores[sname], frac, strat, seed=seed, beta=beta)
                kt = torch.from_numpy(keep)
                for distill in (False, True):
                    if distill and (strat == "easiest" or sname in ("grand", "aum", "entropy")):
                        continue  # the CPU budget: distillation for random, el2n, forgetting, prototype, dbp, semdedup
                    t0 = time.perf_counter()
                    model = fit(x_pool[kt], y_pool[kt], 10, tcfg(seed, steps), stats_from=stats_from,
                                teacher_logits=t_logits[kt] if distill else None)
                    runs.append(dict(score=sname, strategy=strat, fraction=frac, seed=seed, distill=distill,
                                     kept=int(len(keep)), acc=accuracy(model, x_te, y_te),
                                     seconds=time.perf_counter() - t0))
            last = [r for r in runs if r["score"] == sname and r["strategy"] == strat and r["seed"] == seed]
            print(f"seed {seed} {sname}/{strat}: " + " ".join(f"{r['fraction']:.0%}{'d' if r['distill'] else ''}="
                                                              f"{r['acc']:.3f}" for r in last), flush=True)
            save()
    save()
    report(out_stem)


def findings(stat, combos, fractions):
    """The papers' orderings, checked on the means (a difference inside one std is called a tie)."""
    out = ["## Do the papers' orderings reproduce?", ""]
    scores = sorted({sc for sc, st in combos if st == "ccs"}, key=SCORES.index)
    lo, hi = min(fractions), [f for f in fractions if f >= 0.7]

    def cmp(a, b):
        d = a[0] - b[0]
        tol = max(a[1], b[1])
        return ("better" if d > tol else "worse" if d < -tol else "tie") + f" ({a[0]:.2f} vs {b[0]:.2f})"

    r = stat("random", "random", lo, False)
    out.append(f"1. At {lo:.0%} kept, CCS vs random and vs hardest-only (same score), no distillation:")
    for sc in scores:
        c, h = stat(sc, "ccs", lo, False), stat(sc, "hardest", lo, False)
        out.append(f"   - {sc}: CCS vs random {cmp(c, r)}; CCS vs hardest {cmp(c, h)}")
    out.append("2. With ample data (" + ", ".join(f"{f:.0%}" for f in hi) + " kept), hardest vs random, no distillation:")
    for sc in scores:
        out.append(f"   - {sc}: " + "; ".join(f"{f:.0%} {cmp(stat(sc, 'hardest', f, False), stat('random', 'random', f, False))}"
                                            for f in hi))
    out.append("3. Distillation on random subsets (with vs without):")
    out.append("   - " + "; ".join(f"{f:.0%} {cmp(stat('random', 'random', f, True), stat('random', 'random', f, False))}"
                                 for f in fractions))
    out.append("")
    return out


def report(out_stem: Path):
    blob = json.loads(out_stem.with_suffix(".json").read_text())
    runs, fractions = blob["runs"], blob["fractions"]

    def stat(sc, st, fr, d):
        a = [r["acc"] for r in runs if r["score"] == sc and r["strategy"] == st and r["fraction"] == fr and r["distill"] == d]
        return (100 * np.mean(a), 100 * np.std(a), len(a)) if a else None

    combos = []
    for r in runs:
        c = (r["score"], r["strategy"])
        if r["strategy"] != "full" and c not in combos:
            combos.append(c)
    lines = [f"# Data pruning on Fashion-MNIST ({blob['pool']:,}-image pool, small CNN, {blob['steps']} steps of {blob['batch_size']} for every subset)", "",
             f"Command: `{blob['command']}` ({blob['threads']} thread, {blob['cpu_count']}-core shared CPU), "
             f"total {blob['total_seconds'] / 60:.1f} min.", "",
             "Test accuracy (%) on the 10,000 test images, mean ± std over seeds " + ", ".join(map(str, blob["seeds"])) + ".", ""]
    for label, k in (("full pool", "full"), ("teacher", "teacher")):
        a = [r["acc"] for r in runs if r["score"] == k]
        lines.append(f"- {label} ({blob['pool']:,} images, {blob['teacher_steps'] if k == 'teacher' else blob['steps']} steps): "
                     f"{100 * np.mean(a):.2f} ± {100 * np.std(a):.2f}")
    lines.append("")
    for d in (False, True):
        lines += [f"## {'With distillation (T=4, alpha=0.9)' if d else 'Without distillation'}", "",
                  "| score | selection | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
                  "|---|---|" + "---|" * len(fractions)]
        for sc, st in combos:
            cells = [stat(sc, st, f, d) for f in fractions]
            if all(c is None for c in cells):
                continue
            lines.append(f"| {sc} | {st} | " + " | ".join(f"{c[0]:.2f} ± {c[1]:.2f}" if c else "-" for c in cells) + " |")
        lines.append("")
    lines += findings(stat, combos, fractions)
    lines += ["## Scoring time (all 60,000 training images, 1 thread)", "", "| score | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in blob["score_seconds"].items()]
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = ["hardest", "easiest", "ccs"]
    fig, axes = plt.subplots(2, 4, figsize=(20, 9), sharey=True)
    for row, d in enumerate((False, True)):
        for col, st in enumerate(strategies + ["other"]):
            ax = axes[row, col]
            sel = [c for c in combos if (c[1] == st if st != "other" else c[1] in ("dbp", "semdedup"))] + [("random", "random")]
            for sc, s2 in sel:
                pts = [(f, stat(sc, s2, f, d)) for f in fractions]
                pts = [(f, c) for f, c in pts if c]
                if not pts:
                    continue
                ax.errorbar([100 * f for f, _ in pts], [c[0] for _, c in pts], yerr=[c[1] for _, c in pts],
                            marker="o", capsize=2, label=f"{sc}/{s2}", ls="--" if sc == "random" else "-")
            full = 100 * np.mean([r["acc"] for r in runs if r["score"] == "full"])
            ax.axhline(full, color="gray", lw=0.8)
            ax.set_title(f"{st} {'+ distillation' if d else ''}")
            ax.set_xlabel("kept % of the pool")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("test accuracy %")
    fig.suptitle(f"Fashion-MNIST data pruning ({blob['pool']:,}-image pool, small CNN, mean ± std of {len(blob['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(out_stem.with_suffix(".png"), dpi=90)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(RESULTS / "data_pruning")
    else:
        main()
