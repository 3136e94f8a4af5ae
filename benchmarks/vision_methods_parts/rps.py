"""Random parameter sharing (ROAST / STABLE-RPS) against global magnitude pruning at equal memory (the same
number of stored weight values) and equal epochs, Fashion-MNIST SmallCNN.

* rps: every conv / linear weight drawn from one shared array of (1 - s) x their count (chunk ``CHUNK``, random
  signs, ROAST's per-layer scales, STABLE-RPS gradient scaling), trained from scratch ``EPOCHS + FINETUNE`` epochs;
* magnitude: dense training ``EPOCHS`` epochs, global magnitude masks at sparsity s, ``FINETUNE`` epoch(s) of
  masked fine-tuning: (1 - s) x the count of non-zero weights.

Stored bytes at fp32: rps 4 per shared entry (the hashes are a seed); magnitude 4 per non-zero plus a 1-bit
occupancy map over every weight (the cheapest index).
"""

from __future__ import annotations

EPOCHS, FINETUNE = 2, 1
CHUNK = 32
SPARSITIES = (0.9, 0.97)
TRAIN, TEST = 5000, 2000


def run(ctx) -> dict:
    epochs, finetune = ctx.epochs(EPOCHS), ctx.epochs(FINETUNE)
    rows, totals = [], {}
    for s in SPARSITIES:
        res = {"rps": [], "magnitude": []}
        stored = {}
        for seed in ctx.seeds:
            data = ctx.data(seed, train=TRAIN, test=TEST)
            _, _, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                         sparsity=s, learn="rps", options={"chunk": CHUNK})
            L = info["learn"]
            res["rps"].append(info["metrics"]["test_acc"])
            totals["weights"] = L["shared_weights"]
            stored["rps"] = L["budget"]
            _, masks, info = ctx.train_prune(data, model="cnn", epochs=epochs, finetune_epochs=finetune, seed=seed,
                                             sparsity=s, criterion="magnitude", allocation="global")
            res["magnitude"].append(info["metrics"]["test_acc"])
            stored["magnitude"] = masks.kept()
        for label, accs in res.items():
            acc, std = ctx.mean_std(accs)
            n = stored[label]
            nbytes = 4 * n + (0 if label == "rps" else (totals["weights"] + 7) // 8)
            rows.append({"label": f"{label} s={s}", "method": label, "sparsity": s, "acc": round(acc, 4),
                         "acc_std": round(std, 4), "stored_weights": int(n), "bytes": int(nbytes)})
    findings = []
    for s in SPARSITIES:
        r, m = (next(x for x in rows if x["sparsity"] == s and x["method"] == k) for k in ("rps", "magnitude"))
        verdict = ctx.versus(r, m)
        findings.append(f"At {1 - s:.0%} of the weights stored ({r['stored_weights']:,} values), RPS reached "
                        f"{r['acc']:.4f} ± {r['acc_std']:.4f}, {verdict} global magnitude ({m['acc']:.4f} ± "
                        f"{m['acc_std']:.4f}) in {epochs + finetune} epochs; bytes {r['bytes']:,} vs {m['bytes']:,} "
                        "(magnitude also needs its sparsity map).")
    setup = (f"Fashion-MNIST SmallCNN ('cnn', {totals['weights']:,} conv / linear weights), "
             f"{TRAIN if not ctx.quick else ctx.train_subset} training images (seeded subset per seed), "
             f"{TEST if not ctx.quick else ctx.test_subset} test images, SGD lr 0.05 cosine, batch 128, seeds "
             f"{list(ctx.seeds)}. rps: learner `rps` (hash mapping, chunk {CHUNK}, random signs, per-layer scales, "
             f"STABLE-RPS gradient scaling, z ~ N(0, 1)), trained {epochs + finetune} epochs from scratch. magnitude: "
             f"{epochs} dense epoch(s), global magnitude masks, {finetune} masked fine-tune epoch(s). Equal stored "
             f"values (1 - sparsity) x weights at sparsities {list(SPARSITIES)}, equal epochs.")
    return {"setup": setup, "rows": rows, "targets": [], "findings": findings, "plot": "acc"}
