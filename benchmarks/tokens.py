"""Token merging and pruning, measured: quality vs measured throughput of every method over a sweep.

Parts (``--parts``, default all):
  minilm  all-MiniLM-L6-v2 (real weights): pydoc retrieval recall@1/@10 (384 queries over 192 section bodies),
          embedding cosine vs dense on 256 held-out Shakespeare paragraphs, throughput at 256 / 512 tokens,
          batch 1 and 16 (dense and patched forwards interleaved, median).
  vit     the Fashion-MNIST ViT prunekit trains here (prunekit.zoo.vit; 65 tokens): top-1 on the 10k test
          images, images/s at batch 1 and 64.
  vit-size  the same ToMe code on a ViT-S/16-sized model (random weights), speed only: where ToMe pays.
  confirm the speed-ups the targets rest on (ToMe flops 0.6 on MiniLM, ToMe r=12 on the ViT), timed again with
          9 interleaved repeats instead of 3.
  peer    pruna 0.3.4's ToMe for Hugging Face ViT (``pruna/algorithms/token_merging.py``) side by side with
          prunekit's ToMe on the same ViT weights, inputs and metric. pruna's ToMe needs transformers < 5 (it
          subclasses ``ViTSelfAttention``, gone in 5.x) and the pruna package pulls dozens of heavy dependencies,
          so the peer runs in a subprocess with transformers 4.57 installed in a cache folder, and pruna's module
          file is loaded from its wheel with pruna's framework imports replaced by stand-ins (its ToMe code runs
          unchanged).

Writes benchmarks/results/tokens.json, tokens.md and tokens.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import load_json, machine

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT = RESULTS / "tokens.json"

SHORT = 64  # text shorter than this (the queries) is not reduced: merging it costs recall and saves nothing
MINILM = ([{"method": "none"}]
          + [{"method": "tome", "flops": f, "min_tokens": SHORT} for f in (0.8, 0.7, 0.6, 0.55, 0.5)]
          + [{"method": "tome", "flops": 0.6}, {"method": "tome", "r": 16, "min_tokens": SHORT}]
          + [{"method": m, "keep": k, "min_tokens": SHORT} for m in ("zero-tprune", "cls-attention", "random")
             for k in (0.7, 0.5, 0.3)])
# the classifier reads the class token only, so the ViT rows do not unmerge the encoder's output (one row shows
# what unmerging costs)
VIT = ([{"method": "none"}]
       + [{"method": "tome", "r": r, "unmerge": False} for r in (2, 4, 6, 8, 10, 12)]
       + [{"method": "tome", "r": 8, "unmerge": True}]
       + [{"method": m, "keep": k} for m in ("zero-tprune", "cls-attention", "random") for k in (0.7, 0.5, 0.3)])
PEER_R = (4, 8, 12)


def load() -> dict:
    return load_json(OUT)


def save(res: dict) -> None:
    from prunekit.io import write_json

    RESULTS.mkdir(exist_ok=True)
    write_json(OUT, res)


def name(rec: dict) -> str:
    if rec["method"] == "none":
        return "dense"
    if "r" in rec:
        return (f"{rec['method']} r={rec['r']}" + (" decreasing" if rec.get("schedule") == "decreasing" else "")
                + (", output unmerged" if rec.get("unmerge") is True else ""))
    if "flops" in rec:
        return f"{rec['method']} flops={rec['flops']}" + ("" if rec.get("min_tokens") else ", queries too")
    return f"{rec['method']} keep={rec['keep']}"


# --- the peer, in a subprocess with transformers 4 ---

TF4 = {"transformers": "4.57.3", "tokenizers": "0.22.1", "huggingface_hub": "0.36.0"}


def tf4_dir() -> Path:
    from prunekit.zoo.models import cache_dir

    d = cache_dir() / "peers" / "tf4"
    if not (d / "transformers" / "__init__.py").is_file():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(d)]
                       + [f"{k}=={v}" for k, v in TF4.items()], check=True)
    return d


def pruna_file() -> Path:
    from prunekit.zoo.models import cache_dir

    d = cache_dir() / "peers" / "pruna"
    f = d / "pruna" / "algorithms" / "token_merging.py"
    if not f.is_file():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "pruna==0.3.4", "-d", str(d)],
                       check=True)
        import zipfile

        whl = next(d.glob("pruna-0.3.4-*.whl"))
        with zipfile.ZipFile(whl) as z:
            z.extract("pruna/algorithms/token_merging.py", d)
    return f


PEER_SCRIPT = r'''
import json, sys, time, types, statistics, importlib.util
from unittest import mock
import torch, transformers
from safetensors.torch import load_file
assert transformers.__version__.startswith("4."), transformers.__version__
args = json.loads(sys.argv[1])
torch.manual_seed(0)
# the ViT prunekit trained (saved by transformers 5) into transformers 4's module names
cfg = transformers.ViTConfig.from_pretrained(args["model"])
model = transformers.ViTForImageClassification(cfg).eval()
sd = load_file(args["model"] + "/model.safetensors")
ren = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
       "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
       "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
new = {}
for k, v in sd.items():
    for a, b in ren.items():
        k = k.replace(a, b)
    new[k] = v
model.load_state_dict(new, strict=True)
# pruna's module, its framework imports replaced by stand-ins (its ToMe code runs unchanged)
class PrunaAlgorithmBase:
    pass
stubs = {"pruna": types.ModuleType("pruna"), "pruna.algorithms": types.ModuleType("pruna.algorithms"),
         "pruna.algorithms.base": types.ModuleType("pruna.algorithms.base")}
base = types.ModuleType("pruna.algorithms.base.pruna_base"); base.PrunaAlgorithmBase = PrunaAlgorithmBase
checks = types.ModuleType("pruna.engine.model_checks")
checks.is_vit = lambda m: True; checks.is_transformers_pipeline_with_vit = lambda m: False
stubs.update({"pruna.algorithms.base.pruna_base": base, "pruna.engine.model_checks": checks})
for n in ("pruna.algorithms.base.tags", "pruna.config.hyperparameters", "pruna.config.smash_config",
          "pruna.engine.save", "pruna.logging.logger", "ConfigSpace", "pruna.config", "pruna.engine", "pruna.logging"):
    stubs.setdefault(n, mock.MagicMock())
sys.modules.update(stubs)
spec = importlib.util.spec_from_file_location("pruna_token_merging", args["pruna"])
tm = importlib.util.module_from_spec(spec); spec.loader.exec_module(tm)
sys.path.insert(0, args["src"])
import prunekit.tokens as PT
from prunekit.zoo.vit import images
x, y = images("test")
if args.get("test_images"):
    x, y = x[:args["test_images"]], y[:args["test_images"]]
@torch.no_grad()
def top1(f):
    return sum(int((f(x[i:i + 500]).argmax(-1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500)) / len(x)
@torch.no_grad()
def timed(f, xb, reps):
    f(xb); ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(xb); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
dense = lambda xb: model(pixel_values=xb).logits
rows = [{"impl": "dense (transformers 4)", "r": 0, "top1": top1(dense),
         **{f"img_per_s_b{b}": b / timed(dense, x[:b], args["reps"]) for b in (1, 64)}}]
for r in args["r"]:
    for impl in ("pruna token_merging", "prunekit tome"):
        m2 = transformers.ViTForImageClassification(cfg).eval(); m2.load_state_dict(new, strict=True)
        if impl.startswith("pruna"):
            w = tm.TokenMerging._apply(tm.TokenMerging.__new__(tm.TokenMerging), m2,
                                       {"r": r, "trace_source": False, "prop_attn": True})
            f = lambda xb, w=w: w(pixel_values=xb).logits
        else:
            PT.apply(m2, {"method": "tome", "r": r, "unmerge": False})  # as pruna: trace_source False
            f = lambda xb, m2=m2: m2(pixel_values=xb).logits
        row = {"impl": impl, "r": r, "top1": top1(f)}
        for b in (1, 64):
            row[f"img_per_s_b{b}"] = b / timed(f, x[:b], args["reps"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
print(json.dumps({"transformers": transformers.__version__, "rows": rows}))
'''


def vit_size_rows(reps: int) -> dict:
    """Where ToMe pays on a CPU: the same code on a ViT-S/16-sized model (224 px, 197 tokens, hidden 384, 12
    layers; random weights: the cost of a forward does not depend on them), throughput only."""
    from transformers import ViTConfig, ViTForImageClassification

    from prunekit.tokens.bench import paired_speedup

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536, num_labels=1000)
    model = ViTForImageClassification(cfg).eval()
    rows = []
    for r in (8, 13, 16):
        row = {"recipe": {"method": "tome", "r": r, "unmerge": False}}
        for b in (1, 16):
            x = torch.randn(b, 3, 224, 224)
            d, p, sp = paired_speedup(model, {"pixel_values": x}, row["recipe"], reps)
            row[f"speedup_b{b}"], row[f"img_per_s_b{b}"] = sp, b / p
        rows.append(row)
        print(f"  ViT-S/16 size, tome r={r}: x{row['speedup_b1']:.2f}@b1 x{row['speedup_b16']:.2f}@b16", flush=True)
    return {"model": "ViT-S/16 shape, random weights", "rows": rows}


def run_peer(test_images, reps: int) -> dict:
    from prunekit.zoo.models import cache_dir
    from prunekit.zoo.vit import EPOCHS, fashion_vit

    fashion_vit()
    model_dir = cache_dir() / "models" / f"vit-fashion-{EPOCHS}ep"
    env = dict(os.environ, PYTHONPATH=f"{tf4_dir()}")
    args = {"model": str(model_dir), "pruna": str(pruna_file()), "src": str(ROOT.parent / "src"), "r": list(PEER_R),
            "reps": reps, "test_images": test_images}
    p = subprocess.run([sys.executable, "-c", PEER_SCRIPT, json.dumps(args)], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"peer run failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    dense = res["rows"][0]
    for row in res["rows"]:
        for b in (1, 64):
            row[f"speedup_b{b}"] = row[f"img_per_s_b{b}"] / dense[f"img_per_s_b{b}"]
    return res


def confirm_rows(reps: int = 9) -> list[dict]:
    from prunekit.tokens.bench import load_minilm, paired_speedup, text_windows
    from prunekit.zoo.vit import fashion_vit

    rows = []
    model, tok = load_minilm()
    rec = {"method": "tome", "flops": 0.6, "min_tokens": SHORT}
    for L in (256, 512):
        ids = text_windows(tok, L, 16)
        d, p, sp = paired_speedup(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, rec, reps)
        rows.append({"model": "minilm-l6", "recipe": rec, "input": f"{L} tokens, batch 16", "dense_s": d,
                     "patched_s": p, "speedup": sp})
    vit = fashion_vit()
    from prunekit.zoo.vit import images

    x = images("test")[0][:64]
    rec = {"method": "tome", "r": 12, "unmerge": False}
    d, p, sp = paired_speedup(vit, {"pixel_values": x}, rec, reps)
    rows.append({"model": "vit-fashion", "recipe": rec, "input": "batch 64", "dense_s": d, "patched_s": p,
                 "speedup": sp})
    for r in rows:
        print(f"  {r['model']} {name(r['recipe'])} {r['input']}: x{r['speedup']:.2f} ({reps} repeats)", flush=True)
    return rows


# --- report ---

def targets(res: dict) -> list[str]:
    out = []
    mini = res.get("minilm")
    if mini:
        base = mini["task"]
        for L in (256, 512):
            ok = [r for r in mini["rows"] if r["recipe"]["method"] == "tome"
                  and base["recall@10"] - r["recall@10"] <= 0.01]
            if ok:
                best = max(ok, key=lambda r: r[f"speedup_L{L}_b16"])
                sp = best[f"speedup_L{L}_b16"]
                out.append(f"MiniLM {L} tokens, batch 16: best ToMe within 1 point recall@10 is {name(best['recipe'])}: "
                           f"{sp:.2f}x (b1 {best[f'speedup_L{L}_b1']:.2f}x), recall@10 {best['recall@10']:.3f} vs "
                           f"{base['recall@10']:.3f} -> target >= 1.5x {'MET' if sp >= 1.5 else 'MISSED'}")
            else:
                out.append(f"MiniLM {L}: no ToMe setting stays within 1 point recall@10 -> target MISSED")
    vit = res.get("vit")
    if vit:
        base = vit["task"]["top1"]
        ok = [r for r in vit["rows"] if r["recipe"]["method"] == "tome" and base - r["top1"] <= 0.01]
        if ok:
            best = max(ok, key=lambda r: r["speedup_b64"])
            sp = best["speedup_b64"]
            out.append(f"ViT batch 64: best ToMe within 1 point top-1 is {name(best['recipe'])}: {sp:.2f}x "
                       f"(b1 {best['speedup_b1']:.2f}x), top-1 {best['top1']:.4f} vs {base:.4f} -> target >= 1.4x "
                       f"{'MET' if sp >= 1.4 else 'MISSED'}")
        else:
            out.append("ViT: no ToMe setting stays within 1 point top-1 -> target MISSED")
    for part, metric in (("vit", "top1"), ("minilm", "recall@10")):
        if not res.get(part):
            continue
        rows = res[part]["rows"]
        keeps = sorted({r["recipe"]["keep"] for r in rows if "keep" in r["recipe"]}, reverse=True)
        verdicts = []
        for k in keeps:
            got = {r["recipe"]["method"]: r[metric] for r in rows if r["recipe"].get("keep") == k}
            z = got.get("zero-tprune")
            if z is None:
                continue
            ok = z >= got.get("random", -1) and z >= got.get("cls-attention", -1)
            verdicts.append(f"keep {k}: zero-tprune {z:.4f}, cls-attention {got.get('cls-attention', float('nan')):.4f}, "
                            f"random {got.get('random', float('nan')):.4f} {'ok' if ok else 'NOT >= both'}")
        if verdicts:
            allok = all(v.endswith("ok") for v in verdicts)
            out.append(f"{part} {metric}, Zero-TPrune >= random and cls-attention at every keep: "
                       f"{'MET' if allok else 'MISSED'} ({'; '.join(verdicts)})")
    return out


def markdown(res: dict) -> str:
    lines = [f"Machine: {res.get('machine', '?')}", ""]
    mini = res.get("minilm")
    if mini:
        t = mini["task"]
        lines += [f"## all-MiniLM-L6-v2, pydoc retrieval ({t['queries']} queries, {t['sections']} section bodies; "
                  f"dense recall@1 {t['recall@1']:.3f}, recall@10 {t['recall@10']:.3f})", "",
                  "| recipe | recall@1 | recall@10 | cosine vs dense | x 256/b1 | x 256/b16 | x 512/b1 | x 512/b16 | seq/s 512/b16 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mini["rows"]:
            lines.append(f"| {name(r['recipe'])} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['cosine']:.4f} | "
                         f"{r['speedup_L256_b1']:.2f} | {r['speedup_L256_b16']:.2f} | {r['speedup_L512_b1']:.2f} | "
                         f"{r['speedup_L512_b16']:.2f} | {r['seq_per_s_L512_b16']:.1f} |")
        lines.append("")
    vit = res.get("vit")
    if vit:
        lines += [f"## Fashion-MNIST ViT trained here ({vit.get('model', '')}; dense top-1 {vit['task']['top1']:.4f} on "
                  f"{vit['task']['test_images']} test images)", "",
                  "| recipe | top-1 | tokens per layer | x b1 | x b64 | img/s b64 |", "|---|---|---|---|---|---|"]
        for r in vit["rows"]:
            lines.append(f"| {name(r['recipe'])} | {r['top1']:.4f} | {r['tokens']} | {r['speedup_b1']:.2f} | "
                         f"{r['speedup_b64']:.2f} | {r['img_per_s_b64']:.0f} |")
        lines.append("")
    vs = res.get("vit_size")
    if vs:
        lines += [f"## ToMe speed at ViT-S/16 size ({vs['model']}; 197 tokens, hidden 384, 12 layers)", "",
                  "| recipe | x b1 | x b16 | img/s b16 |", "|---|---|---|---|"]
        for r in vs["rows"]:
            lines.append(f"| {name(r['recipe'])} | {r['speedup_b1']:.2f} | {r['speedup_b16']:.2f} | {r['img_per_s_b16']:.1f} |")
        lines.append("")
    peer = res.get("peer")
    if peer:
        lines += [f"## Peer: pruna 0.3.4 ToMe vs prunekit ToMe, same ViT weights (transformers {peer['transformers']})",
                  "", "| implementation | r | top-1 | img/s b1 | img/s b64 | x b1 | x b64 |", "|---|---|---|---|---|---|---|"]
        for r in peer["rows"]:
            lines.append(f"| {r['impl']} | {r['r']} | {r['top1']:.4f} | {r['img_per_s_b1']:.1f} | "
                         f"{r['img_per_s_b64']:.0f} | {r['speedup_b1']:.2f} | {r['speedup_b64']:.2f} |")
        lines.append("")
    conf = res.get("confirm")
    if conf:
        lines += ["## The target rows timed again (9 interleaved repeats)", "",
                  "| model | recipe | input | dense s | patched s | speed-up |", "|---|---|---|---|---|---|"]
        for r in conf:
            lines.append(f"| {r['model']} | {name(r['recipe'])} | {r['input']} | {r['dense_s']:.4f} | "
                         f"{r['patched_s']:.4f} | {r['speedup']:.2f} |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {t}" for t in targets(res)]
    return "\n".join(lines) + "\n"


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("minilm", "speedup_L256_b16", "recall@10", "MiniLM pydoc retrieval (256 tokens, batch 16)"),
              ("vit", "speedup_b64", "top1", "Fashion-MNIST ViT (batch 64)"))
    for ax, (part, xk, yk, title) in zip(axes, panels):
        if not res.get(part):
            ax.set_visible(False)
            continue
        def sweep(rec):  # the main sweep of each method (a line); other variants are single points
            if rec["method"] != "tome":
                return True
            return (rec.get("min_tokens") == SHORT and "flops" in rec) or rec.get("unmerge") is False

        for method, marker in (("tome", "o"), ("zero-tprune", "s"), ("cls-attention", "^"), ("random", "x"),
                               ("none", "*")):
            rows = sorted((r for r in res[part]["rows"] if r["recipe"]["method"] == method and sweep(r["recipe"])),
                          key=lambda r: r[xk])
            if rows:
                ax.plot([r[xk] for r in rows], [r[yk] for r in rows], marker=marker, linestyle="-" if method != "none" else "",
                        label=method, markersize=9 if method == "none" else 6)
        for r in res[part]["rows"]:
            if not sweep(r["recipe"]):
                ax.plot([r[xk]], [r[yk]], marker="D", linestyle="", color="grey")
                ax.annotate(name(r["recipe"]), (r[xk], r[yk]), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_xlabel("measured speed-up vs dense")
        ax.set_ylabel(yk)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "tokens.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="minilm,vit,vit-size,confirm,peer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=None, help="ViT: evaluate on the first N test images")
    ap.add_argument("--quick", action="store_true", help="two recipes per part, 2 repeats, 1000 test images")
    a = ap.parse_args()
    from prunekit.tokens.bench import minilm_rows, vit_rows

    torch.manual_seed(0)
    res = load()
    res["machine"] = machine()
    parts = a.parts.split(",")
    reps = 2 if a.quick else a.repeats
    test_images = 1000 if a.quick else a.test_images
    if "minilm" in parts:
        t0 = time.perf_counter()
        print("MiniLM:", flush=True)
        res["minilm"] = minilm_rows(MINILM[:3] if a.quick else MINILM, repeats=reps)
        res["minilm"]["seconds"] = time.perf_counter() - t0
        save(res)
    if "vit" in parts:
        from prunekit.zoo.vit import EPOCHS

        t0 = time.perf_counter()
        print("ViT:", flush=True)
        res["vit"] = vit_rows(VIT[:3] if a.quick else VIT, repeats=reps, test_images=test_images)
        res["vit"]["model"] = f"prunekit.zoo.vit, {EPOCHS} epochs"
        res["vit"]["seconds"] = time.perf_counter() - t0
        save(res)
    if "vit-size" in parts:
        print("ViT-S/16-sized (speed only):", flush=True)
        res["vit_size"] = vit_size_rows(reps)
        save(res)
    if "confirm" in parts:
        print("confirm (9 repeats):", flush=True)
        res["confirm"] = confirm_rows()
        save(res)
    if "peer" in parts:
        print("peer (pruna ToMe, transformers 4 subprocess):", flush=True)
        res["peer"] = run_peer(test_images, reps)
        save(res)
    (RESULTS / "tokens.md").write_text(markdown(res))
    plot(res)
    print(markdown(res))


if __name__ == "__main__":
    main()
