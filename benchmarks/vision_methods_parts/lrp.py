"""Pruning by Explaining (Yeom et al., Pattern Recognition 2021) in the paper's transfer setting: EfficientNet-Lite0
with its real ImageNet weights, fine-tuned on Fashion-MNIST (``ctx.lite0_fashion()``, cached), then 50% and 70% of
the filters of every coupled channel group removed (Torch-Pruning graph, the classifier kept) by

* ``lrp``       the absolute LRP relevance (alpha2-beta1 on convolutions, epsilon on the classifier) of the group's
                weights on the reference samples,
* ``magnitude`` the group L2 norm (data-free),
* ``taylor``    the group first-order Taylor score on the same reference samples.

Each seed draws other reference samples (``SCORE_BATCHES`` x ``BATCH`` training images) and fine-tunes with its own
seed; every criterion prunes its own copy of the same fine-tuned model. Test accuracy on the first ``TEST`` test
images right after the removal (BatchNorm statistics re-estimated on 20 training batches, weights untouched) and after
``FINETUNE`` epoch(s) on ``FT_TRAIN`` training images (the same for every criterion, then the same re-estimation).
"""

from __future__ import annotations

import copy

import torch

from prunekit.vision.channels import count_macs, prune_channels
from prunekit.vision.data import batches_of
from prunekit.vision.train import evaluate, recalibrate_bn, train_epochs

RATIOS = (0.5, 0.7)
CRITERIA = ("lrp", "magnitude", "taylor")
SCORE_BATCHES, BATCH = 3, 64
TEST, FT_TRAIN, FINETUNE, LR = 2000, 3000, 1, 0.01


def run(ctx) -> dict:
    dense, data = ctx.lite0_fashion()
    test = min(TEST, len(data["y_test"]))
    x_test, y_test = data["x_test"][:test], data["y_test"][:test]
    ft_n = min(FT_TRAIN, len(data["y_train"]))
    ft_data = {**data, "x_train": data["x_train"][:ft_n], "y_train": data["y_train"][:ft_n]}
    example = data["x_train"][:2]
    finetune = ctx.epochs(FINETUNE)
    dense_acc = evaluate(dense, x_test, y_test)
    dense_macs = count_macs(dense, example[:1])
    dense_params = sum(p.numel() for p in dense.parameters())
    res = {(r, c): {"cut": [], "acc": [], "macs": [], "params": []} for r in RATIOS for c in CRITERIA}
    for seed in ctx.seeds:
        cfg = ctx.config(model="efficientnet-lite0", structure="channels", lr=LR, batch_size=BATCH, seed=seed,
                         score_batches=SCORE_BATCHES)
        batches = batches_of(data, SCORE_BATCHES, BATCH, seed)  # this seed's reference samples
        for ratio in RATIOS:
            for crit in CRITERIA:
                model = copy.deepcopy(dense)
                prune_channels(model, example, ratio, crit, batches=batches)
                recalibrate_bn(model, data, 20, 128, seed)
                r = res[(ratio, crit)]
                r["cut"].append(evaluate(model, x_test, y_test))
                torch.manual_seed(seed)
                train_epochs(model, ft_data, finetune, cfg, None, f"finetune {crit} {ratio:.0%}", progress=False,
                             seed=seed)
                recalibrate_bn(model, data, 20, 128, seed)
                r["acc"].append(evaluate(model, x_test, y_test))
                r["macs"].append(count_macs(model, example[:1]))
                r["params"].append(sum(p.numel() for p in model.parameters()))
    rows = [{"label": "dense (Lite0 on Fashion-MNIST)", "acc": round(dense_acc, 4), "acc_std": 0.0,
             "acc_pruned": round(dense_acc, 4), "acc_pruned_std": 0.0, "macs_ratio": 1.0, "params": dense_params}]
    stats = {}
    for ratio in RATIOS:
        for crit in CRITERIA:
            r = res[(ratio, crit)]
            acc, acc_std = ctx.mean_std(r["acc"])
            cut, cut_std = ctx.mean_std(r["cut"])
            stats[(ratio, crit)] = (cut, acc)
            rows.append({"label": f"{crit} {ratio:.0%} filters removed", "acc": round(acc, 4),
                         "acc_std": round(acc_std, 4), "acc_pruned": round(cut, 4), "acc_pruned_std": round(cut_std, 4),
                         "macs_ratio": round(ctx.mean_std(r["macs"])[0] / dense_macs, 3),
                         "params": int(ctx.mean_std(r["params"])[0])})
    wins, parts = [], []
    for ratio in RATIOS:
        l_cut, l_acc = stats[(ratio, "lrp")]
        m_cut, m_acc = stats[(ratio, "magnitude")]
        t_cut, t_acc = stats[(ratio, "taylor")]
        wins.append(l_cut >= max(m_cut, t_cut) and l_acc >= max(m_acc, t_acc))
        parts.append(f"{ratio:.0%}: right after pruning lrp {l_cut:.4f} vs magnitude {m_cut:.4f}, taylor {t_cut:.4f}; "
                     f"after the fine-tune lrp {l_acc:.4f} vs magnitude {m_acc:.4f}, taylor {t_acc:.4f}")
    target = {"target": "LRP ≥ magnitude and Taylor in the transfer setting at 50% and 70% of filters removed",
              "met": all(wins),
              "detail": "; ".join(parts) + f" (means over seeds {list(ctx.seeds)}; met = LRP's mean at least both "
                        "baselines' means both right after pruning and after the fine-tune, at both ratios)."}
    setup = (f"EfficientNet-Lite0 with its real ImageNet weights, classifier replaced and fine-tuned 1 epoch on 6000 "
             f"Fashion-MNIST images (64x64 RGB; ctx.lite0_fashion, cached; dense test accuracy {dense_acc:.4f}). "
             f"Channel pruning through the Torch-Pruning graph, the same ratio in every coupled group ({', '.join(f'{r:.0%}' for r in RATIOS)} "
             f"of the filters), classifier kept, each criterion on its own copy of the same model: lrp (alpha2-beta1 "
             f"on convolutions, epsilon on the classifier, bias ignored, BatchNorm and activation modules pass "
             f"relevance through, relevance 1 at each sample's true class, absolute contributions summed over the "
             f"group's weights), magnitude (group L2), taylor (group first-order Taylor). Reference samples: "
             f"{SCORE_BATCHES} x {BATCH} training images drawn per seed (lrp and taylor). Accuracy on the first {test} "
             f"test images right after removal (BatchNorm statistics re-estimated on 20 x 128 training images, weights "
             f"untouched) and after {finetune} epoch(s) of SGD (lr {LR}, cosine, batch {BATCH}) on {ft_n} training images "
             f"plus the same re-estimation; seeds {list(ctx.seeds)} (reference samples, fine-tune order). 1 CPU thread.")
    return {"setup": setup, "rows": rows, "targets": [target], "findings": [], "plot": "acc_pruned"}
