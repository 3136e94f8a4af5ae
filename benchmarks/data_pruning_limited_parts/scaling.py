"""The scaling view of "Beyond neural scaling laws" (Sorscher et al. 2022): test error against the number of kept
examples on log-log axes, for random pruning and for each score at its better keep-easy / keep-hard choice, with
fitted power-law exponents (error ~ n^-b); and the paper's crossover: keep the easy examples when little data is
kept, the hard ones when much is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pruning_limited_parts.grid import grid

RESULTS = Path(__file__).resolve().parent.parent / "results"


def exponent(ns, errs) -> tuple[float, float]:
    """Least-squares slope b and R^2 of log(error) = a - b log(n)."""
    lx, ly = np.log(np.asarray(ns, float)), np.log(np.asarray(errs, float))
    slope, icpt = np.polyfit(lx, ly, 1)
    pred = icpt + slope * lx
    ss = ((ly - ly.mean()) ** 2).sum()
    return float(-slope), float(1 - ((ly - pred) ** 2).sum() / ss) if ss > 0 else 1.0


def run(ctx) -> dict:
    from data_pruning_limited import SUPERVISED

    g = grid(ctx)
    n_pool = len(ctx.images()["pool"])
    fr = sorted(g["random"])
    mean = {k: {f: 100 * float(np.mean(v)) for f, v in d.items()} for k, d in g.items()}
    std = {k: {f: 100 * float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for f, v in d.items()} for k, d in g.items()}
    names = list(SUPERVISED) + ["prototype-pca", "prototype-lite0", "prototype-simclr"]
    curves = {"random": [mean["random"][f] for f in fr]}
    for n in names:
        curves[f"{n} (better of easy/hard)"] = [max(mean[f"{n}/easiest"][f], mean[f"{n}/hardest"][f]) for f in fr]
    ns = [round(f * n_pool) for f in fr]
    rows = []
    for label, accs in curves.items():
        b, r2 = exponent(ns, [100 - a for a in accs])
        rows.append({"label": label, "exponent b (error ~ n^-b)": round(b, 3), "R2": round(r2, 3),
                     **{f"{f:.0%}": round(a, 2) for f, a in zip(fr, accs)}, "acc": round(float(np.mean(accs)), 2)})
    # the crossover, per score: easy beats hard at 10-20% kept; hard >= random (not below by more than one std)
    # at 70-90% kept
    low, high = [f for f in fr if f <= 0.2 and f >= 0.1], [f for f in fr if f >= 0.7]
    checks, best_name, best_mean = [], None, -1.0
    for n in names:
        easy_low = all(mean[f"{n}/easiest"][f] > mean[f"{n}/hardest"][f] for f in low)
        hard_high = all(mean[f"{n}/hardest"][f] >= mean["random"][f] - std["random"][f] for f in high)
        checks.append((n, easy_low, hard_high))
        m = float(np.mean(curves[f"{n} (better of easy/hard)"]))
        if m > best_mean:
            best_mean, best_name = m, n
    detail = "; ".join(
        f"{n}: easy>hard at {'/'.join(f'{f:.0%}' for f in low)} {'yes' if a else 'no'} ("
        + ", ".join(f"{mean[f'{n}/easiest'][f]:.2f} vs {mean[f'{n}/hardest'][f]:.2f}" for f in low)
        + f"), hard>=random at {'/'.join(f'{f:.0%}' for f in high)} {'yes' if b else 'no'} ("
        + ", ".join(f"{mean[f'{n}/hardest'][f]:.2f} vs {mean['random'][f]:.2f}" for f in high) + ")"
        for n, a, b in checks)
    best = next(c for c in checks if c[0] == best_name)
    if not ctx.quick:
        _plot(fr, ns, mean, best_name, curves)
    findings = [f"scores with the full crossover: {', '.join(n for n, a, b in checks if a and b) or 'none'}",
                "exponents: random b = " + f"{rows[0]['exponent b (error ~ n^-b)']:.3f}; " + ", ".join(
                    f"{r['label'].split(' ')[0]} {r['exponent b (error ~ n^-b)']:.3f}" for r in rows[1:])]
    return {"setup": f"Test error (100 - accuracy, %) against kept examples n (of {n_pool:,}), log-log; rows: mean "
            "test accuracy per kept fraction (grid part) and the fitted exponent b of error ~ n^-b over all "
            "fractions. The paper's better-than-power-law claim needs b(score) > b(random). Plot: "
            "results/data_pruning_limited_scaling.png.",
            "rows": rows, "plot": "acc",
            "targets": [{"target": "the crossover: at 10-20% kept easy-keeping beats hard-keeping, at 70-90% kept "
                         "hard-keeping >= random (checked on the best score: the highest mean of its better "
                         "easy/hard curve)", "met": bool(best[1] and best[2]),
                         "detail": f"best score {best_name}. " + detail}],
            "findings": findings}


def _plot(fr, ns, mean, best_name, curves) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.loglog(ns, [100 - mean["random"][f] for f in fr], "k-o", label="random")
    for strat, style in (("easiest", "g--s"), ("hardest", "r--^")):
        ax.loglog(ns, [100 - mean[f"{best_name}/{strat}"][f] for f in fr], style, label=f"{best_name} keep {strat}")
    ax.loglog(ns, [100 - a for a in curves[f"{best_name} (better of easy/hard)"]], "b-", lw=2, alpha=0.5,
              label=f"{best_name}: better of the two")
    ax.set_xlabel("kept training examples")
    ax.set_ylabel("test error (%)")
    ax.set_title("Data-limited Fashion-MNIST (frozen Lite0 features + MLP head)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "data_pruning_limited_scaling.png", dpi=110)
