"""The distillation findings ("Distilling the Knowledge in Data Pruning", Ben-Baruch et al. 2025): a student
trained on a pruned subset with loss (1 - alpha) CE + alpha T^2 KL(teacher || student), the teacher trained on the
whole pool. (1) The optimal distillation weight alpha as a function of the kept fraction (a sweep); (2) the
teacher-capacity effect (a smaller teacher than the student, the same, a larger one); (3) the headline claim:
random + distillation >= every score without distillation, at every fraction."""

from __future__ import annotations

from data_pruning_limited import FRACTIONS
from data_pruning_limited_parts.grid import STRATEGIES, grid

ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
T = 4.0
TEACHERS = (("linear", 256, "linear probe (smaller than the student)"), ("mlp", 256, "MLP 256 (the student's size)"),
            ("mlp", 1024, "MLP 1024 (larger)"))


def run(ctx) -> dict:
    g = grid(ctx)
    fractions = [f for f in ((0.1, 0.5) if ctx.quick else FRACTIONS)]
    alphas = (0.0, 0.9) if ctx.quick else ALPHAS
    rows, sweep = [], {}
    tl = {s: ctx.teacher_logits(s) for s in ctx.seeds}
    for f in fractions:
        for a in alphas:
            accs = [ctx.head(ctx.keep("random", "random", f, s), s, label=f"random/{f}",
                             teacher_logits=tl[s] if a > 0 else None, alpha=a, temperature=T) for s in ctx.seeds]
            r = ctx.row(f"random {f:.0%}, alpha {a}", accs, fraction=f, alpha=a)
            sweep[(f, a)] = r
            rows.append(r)
    best_alpha = {f: max((sweep[(f, a)] for a in alphas), key=lambda r: r["acc"])["alpha"] for f in fractions}
    # teacher capacity at a small and a larger kept fraction, alpha 0.9
    cap_fracs = [f for f in (0.05, 0.1, 0.5, 0.9) if f in fractions] or fractions
    cap = {}
    for model, hidden, name in TEACHERS:
        t_acc = [ctx.teacher_accuracy(s, hidden, model) for s in ctx.seeds]
        for f in cap_fracs:
            accs = [ctx.head(ctx.keep("random", "random", f, s), s, label=f"random/{f}/teacher-{model}-{hidden}",
                             teacher_logits=ctx.teacher_logits(s, hidden, model), alpha=0.9, temperature=T)
                    for s in ctx.seeds]
            cap[(name, f)] = r = ctx.row(f"teacher {name} at {f:.0%}", accs, fraction=f,
                                         teacher_acc=round(100 * sum(t_acc) / len(t_acc), 2))
            rows.append(r)
    # random + KD (alpha 0.9, the data family's default) against every score without KD
    claim, worse = [], []
    for f in fractions:
        kd = sweep[(f, 0.9)]
        best_label, best_row = max(((lab, ctx.row(lab, d[f])) for lab, d in g.items()
                                    if lab != "full" and "/" in lab and lab.split("/")[-1] in STRATEGIES),
                                   key=lambda t: t[1]["acc"])
        plain = ctx.row("random", g["random"][f])
        v = ctx.versus(kd, best_row)
        claim.append(f"{f:.0%}: random+KD {kd['acc']:.2f} ± {kd['acc_std']:.2f} vs best score {best_label} "
                     f"{best_row['acc']:.2f} ± {best_row['acc_std']:.2f} ({v}; random without KD {plain['acc']:.2f})")
        if v == "below":
            worse.append(f"{f:.0%}")
    small = min(cap_fracs)
    order = sorted(TEACHERS, key=lambda t: -cap[(t[2], small)]["acc"])
    findings = ["best alpha per kept fraction: " + ", ".join(f"{f:.0%} {a}" for f, a in best_alpha.items()),
                f"teacher ranking at {small:.0%} kept (best first): " + " > ".join(t[2] for t in order),
                f"teacher ranking at {max(cap_fracs):.0%} kept: " + " > ".join(
                    t[2] for t in sorted(TEACHERS, key=lambda t: -cap[(t[2], max(cap_fracs))]["acc"]))]
    smaller_wins = cap[(TEACHERS[0][2], small)]["acc"] > cap[(TEACHERS[2][2], small)]["acc"]
    return {"setup": f"Random subsets of the pool; T = {T}; teachers trained on the whole pool (early stopping on the "
            "validation split), one per seed; the student is the protocol's MLP head. alpha 0 = no distillation.",
            "rows": rows,
            "targets": [{"target": "random + distillation >= every score without distillation at every fraction "
                         "(not below the best score by more than one std)", "met": not worse,
                         "detail": "; ".join(claim)},
                        {"target": "with little data a smaller teacher beats a larger one (the paper's observation)",
                         "met": bool(smaller_wins), "detail": f"at {small:.0%} kept: " + ", ".join(
                             f"{t[2]} {cap[(t[2], small)]['acc']:.2f} (teacher {cap[(t[2], small)]['teacher_acc']:.2f})"
                             for t in TEACHERS)}],
            "findings": findings}
