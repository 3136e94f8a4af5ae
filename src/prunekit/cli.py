"""`prunekit` command line: thin — parse, call the API, print. Nothing imports this module."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunekit.cli_options import Overwrite, Progress, out_option, recipe_option, seed_option, start
from prunekit.core.progress import say
from prunekit.data.cli import data_app
from prunekit.tokens.cli import tokens_app
from prunekit.context.cli import context_app
from prunekit.diffusion.cli import diffusion_app
from prunekit.errors import PruneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune neural networks, measured honestly.")
app.add_typer(data_app, name="data")
app.add_typer(tokens_app, name="tokens")
app.add_typer(context_app, name="context")
app.add_typer(diffusion_app, name="diffusion")


_say = say


@app.command()
def zoo(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List every bundled asset of every family: what it is, how it installs, whether it is here (all offline)."""
    from prunekit.zoo.catalog import assets

    items = assets()
    if as_json:
        print(json.dumps([a.to_dict() for a in items], indent=2))
        return
    for family in ("llm", "vision", "data", "tokens", "context", "diffusion"):
        print(f"{family}:")
        for a in (x for x in items if x.family == family):
            mark = "ok     " if a.available() else "missing"
            print(f"  {mark} {a.name:<26} {a.kind:<8} {a.what}")
            if not a.available():
                print(f"          install: {a.install}")
    print("models for prunekit prune / eval also: <directory> (any local Hugging Face model directory, a prunekit "
          "output too) or <owner/name> (a hub id, needs a network)")
    print("texts also: PATH.txt (any text file: first 80% calibration, last 20% evaluation)")


def _load_windows(tok, text: str, split: str, seqlen: int, windows: int | None, bos: int | None):
    from prunekit.batches import evaluation_windows, tokenize
    from prunekit.zoo import load_text

    return evaluation_windows(tokenize(tok, load_text(text, split)), seqlen, windows, what=f"text {text!r}", bos=bos)


_BOS_HELP = "start every window with the begin-of-sequence token (default: as the tokenizer does)"


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="zoo name (smollm2-135m), model directory or hub id")],
    out: Annotated[Path, out_option("output directory (must not exist unless --overwrite)")],
    method: Annotated[Optional[str], typer.Option(help="magnitude | wanda | sparsegpt | gblm | d-pruner (domain Taylor importance + the general text's OBS saliency)")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="fraction removed, [0, 1): of the weights of each layer, or with --structure of each sublayer's weights (hidden: channels)")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="unstructured, or N:M (N zeros in every M), e.g. 2:4")] = None,
    allocation: Annotated[Optional[str], typer.Option(help="uniform | global | owl | lamp | list | sensitivity | rd (rate-distortion: measured output-distortion curves, dynamic program): how sparsity spreads over layers")] = None,
    rd_grid: Annotated[Optional[str], typer.Option(help="--allocation rd: comma-separated sparsities each unit's output distortion is measured at (default 0.1,...,0.9)")] = None,
    rd_unit: Annotated[Optional[str], typer.Option(help="--allocation rd: block (default) | layer: the unit of one distortion curve")] = None,
    min_density: Annotated[Optional[float], typer.Option(help="global: least fraction of weights each layer keeps")] = None,
    owl_m: Annotated[Optional[float], typer.Option(help="OWL: outlier threshold, multiple of the mean score")] = None,
    owl_lambda: Annotated[Optional[float], typer.Option(help="OWL: half-range of the layer sparsities")] = None,
    per_layer: Annotated[Optional[str], typer.Option(help="list: comma-separated sparsity per decoder layer")] = None,
    sensitivity_table: Annotated[Optional[str], typer.Option(help="--allocation sensitivity / rd: the sensitivity.json (or its directory) of prunekit sensitivity (rd: --measure distortion)")] = None,
    gblm_alpha: Annotated[Optional[float], typer.Option(help="GBLM: weight of the gradient term (0 = Wanda)")] = None,
    dpruner_lambda: Annotated[Optional[float], typer.Option(help="d-pruner: weight of the general text's saliency against the domain's Taylor importance, both mean 1 per layer (0 = the domain's gradient-only importance; default 1)")] = None,
    general_text: Annotated[Optional[str], typer.Option(help="d-pruner: the general text whose saliency is kept (default: the bundled text that is not --calib)")] = None,
    calib_mode: Annotated[Optional[str], typer.Option(help="sequential (default) or one-pass")] = None,
    calib_batch_size: Annotated[Optional[str], typer.Option(help="sequences per calibration forward pass (default 8), or 'all' (the whole set per block when memory allows)")] = None,
    calib_precision: Annotated[Optional[str], typer.Option(help="fp32 (default) | bf16: calibration forwards in bfloat16 autocast (faster on AMX CPUs and GPUs)")] = None,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help=_BOS_HELP)] = None,
    recover: Annotated[Optional[str], typer.Option("--recover", help="train after pruning: perp | lora | full | distill")] = None,
    recover_steps: Annotated[Optional[int], typer.Option(help="recovery optimizer steps")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="fnmatch pattern of layer names to keep dense; repeatable")] = None,
    calib: Annotated[Optional[str], typer.Option(help="calibration text: shakespeare | pydoc | PATH.txt")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="calibration sequences")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="tokens per calibration sequence")] = None,
    seed: Annotated[Optional[int], seed_option("seed of the calibration sampling")] = None,
    blocksize: Annotated[Optional[int], typer.Option(help="SparseGPT column block")] = None,
    dampening: Annotated[Optional[float], typer.Option(help="SparseGPT dampening fraction")] = None,
    recipe: Annotated[Optional[Path], recipe_option()] = None,
    eval_text: Annotated[Optional[str], typer.Option(help="text for before/after perplexity (default: the calibration text's evaluation split); 'none' skips")] = None,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows of --seqlen tokens")] = 16,
    generations: Annotated[int, typer.Option(help="greedy generations shown dense vs pruned")] = 3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    overwrite: Overwrite = False,
    progress: Progress = True,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="allow a model directory's own code (auto_map) to run; only for code you have read")] = False,
    structure: Annotated[Optional[str], typer.Option(help="structured: what to remove in width, any of heads,mlp,hidden (hidden = residual stream; the model shrinks)")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="old spelling of --sparsity with --structure (deprecated)", hidden=True)] = None,
    criterion: Annotated[Optional[str], typer.Option(help="structured: fluctuation (FLAP, default) | magnitude | magnitude-l1 | taylor | random | cfsp (block ratios from angular distance) | loraprune (LoRA-gradient importance, iterative rounds with LoRA training)")] = None,
    global_rank: Annotated[bool, typer.Option("--global-rank", help="structured: rank standardized scores over all layers (sizes then differ per layer)")] = False,
    bias_compensation: Annotated[bool, typer.Option("--bias-compensation", help="structured: add the removed channels' mean output to o_proj/down_proj biases (FLAP)")] = False,
    gqa: Annotated[Optional[str], typer.Option(help="structured, GQA models: query (one query head in every kv group, default) | kv (whole kv groups)")] = None,
    remove_layers: Annotated[Optional[int], typer.Option(help="structured: remove this many whole layers, lowest block influence first")] = None,
    remove_sublayers: Annotated[Optional[int], typer.Option(help="structured: remove this many attention / MLP sublayers")] = None,
    sublayer_method: Annotated[Optional[str], typer.Option(help="structured: influence (one pass, default) | greedy (FinerCut, slower)")] = None,
    learn: Annotated[Optional[str], typer.Option(help="structured: learn the heads / MLP masks instead of scoring them: compresso (hard-concrete gates + LoRA under a target-size Lagrangian, then removed for real)")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="--criterion loraprune: pruning rounds to the target, LoRA training before each (default 2)")] = None,
    beta: Annotated[Optional[float], typer.Option(help="--criterion loraprune: moving average of the importance over LoRA steps, in [0, 1) (default 0.9)")] = None,
    lora_steps: Annotated[Optional[int], typer.Option(help="loraprune / compresso: LoRA training steps in all (default 80)")] = None,
    lora_lr: Annotated[Optional[float], typer.Option(help="loraprune / compresso: LoRA learning rate (default 5e-4)")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="loraprune / compresso: LoRA rank (default 8)")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="loraprune / compresso: LoRA alpha, the scaling is alpha / rank (default 16)")] = None,
    lora_batch_size: Annotated[Optional[int], typer.Option(help="loraprune / compresso: calibration windows per LoRA step (default 4)")] = None,
    gate_lr: Annotated[Optional[float], typer.Option(help="--learn compresso: learning rate of the gates and Lagrange multipliers (default 0.1)")] = None,
    collaborative_prompt: Annotated[bool, typer.Option("--collaborative-prompt", help="--learn compresso: put the collaborative prompt (the model is told it is being pruned) before every training window")] = False,
    experts: Annotated[Optional[str], typer.Option(help="mixture of experts: remove or merge whole experts per layer by frequency | reap | enumerate | merge")] = None,
    keep_experts: Annotated[Optional[int], typer.Option(help="with --experts: experts kept in each MoE layer (or --sparsity: the fraction removed)")] = None,
    experts_allocation: Annotated[Optional[str], typer.Option(help="with --experts: uniform (default) | global (one budget over layers by score)")] = None,
    recalibrate_router: Annotated[Optional[int], typer.Option(help="with --experts: Adam steps fitting each pruned layer's router to the full layer's output (default 0: off)")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="stream the checkpoint from disk one block at a time (models larger than RAM); the stored dtype is kept")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="with --stream: continue the interrupted run whose checkpoint sits beside --out (or start one)")] = False,
    offload_dir: Annotated[Optional[Path], typer.Option(help="with --stream: keep the calibration activations in files here instead of memory")] = None,
    out_format: Annotated[str, typer.Option("--format", help="with --stream: safetensors (dense, default; vLLM loads it) | compressed-tensors (bitmask / 2:4 sparse, smaller on disk)")] = "safetensors",
    distill: Annotated[Optional[int], typer.Option("--distill", help="then distil from the dense model for this many steps (every weight trained, zeros kept; resumable with --resume)")] = None,
    distill_iterations: Annotated[Optional[int], typer.Option(help="with --structure: prune in this many parts, distilling after each (Minitron)")] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="with --distill and --structure heads/mlp: how each part is shared out over the blocks: even (default) | adapt-pruner (by block angular distance, re-measured before every part)")] = None,
    adapt_amplitude: Annotated[Optional[float], typer.Option(help="with --schedule adapt-pruner: per part, how far a block's sparsity moves from the even step times its normalized importance (default 0.02)")] = None,
    distill_text: Annotated[Optional[str], typer.Option(help="distillation text, its calibration split: shakespeare | pydoc | PATH.txt")] = None,
    distill_precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 (forward passes in bfloat16 autocast: much faster on CPUs with AMX)")] = None,
    ood_text: Annotated[Optional[str], typer.Option(help="with --recover / --distill: a text the training never saw, also evaluated (default: pydoc after shakespeare, else shakespeare); 'none' skips")] = None,
) -> None:
    """Prune MODEL and save it to --out (loads with stock transformers).

    With --structure / --remove-layers / --remove-sublayers (or a recipe's structure section) whole heads, MLP
    channels or layers are removed and the saved model is smaller; it says whether stock transformers loads it.
    """
    start(progress, hf=True)
    from prunekit import api
    from prunekit.arch import adapter_for
    from prunekit.recipe import Recipe

    fields: dict = {}
    if recipe is not None:
        fields = Recipe.from_file(recipe).model_dump(exclude_unset=True)
    structured = structure is not None or remove_layers is not None or remove_sublayers is not None or bool(fields.get("structure"))
    by_experts = experts is not None or keep_experts is not None or bool(fields.get("experts"))
    if (keep_experts is not None or experts_allocation is not None or recalibrate_router is not None) and not (
            experts is not None or fields.get("experts")):
        raise PruneError("--keep-experts, --experts-allocation and --recalibrate-router go with --experts METHOD; add it.")
    if ratio is not None:
        import warnings

        warnings.warn("--ratio is now --sparsity (with --structure); --ratio will be removed in the next release",
                      FutureWarning, stacklevel=1)
        if sparsity is not None and sparsity != ratio:
            raise PruneError("Give --sparsity only (not also its old spelling --ratio).")
        sparsity, structured = ratio, True  # --ratio always meant the structure section
    flags = {"method": method, "sparsity": None if structured or by_experts else sparsity, "pattern": pattern}
    fields.update({k: v for k, v in flags.items() if v is not None})
    opts = {k: v for k, v in {"blocksize": blocksize, "dampening": dampening, "alpha": gblm_alpha, "lam": dpruner_lambda,
                              "general_text": general_text}.items() if v is not None}
    if opts:  # method options: each flag belongs to one method
        owner = {"blocksize": "sparsegpt", "dampening": "sparsegpt", "alpha": "gblm", "lam": "d-pruner",
                 "general_text": "d-pruner"}
        m_name = fields.get("method", "wanda")
        wrong = [k for k in opts if owner[k] != m_name]
        if wrong:
            flag = {"blocksize": "--blocksize", "dampening": "--dampening", "alpha": "--gblm-alpha",
                    "lam": "--dpruner-lambda", "general_text": "--general-text"}[wrong[0]]
            raise PruneError(f"{flag} is an option of method {owner[wrong[0]]}, not {m_name}; drop it or use --method {owner[wrong[0]]}.")
        fields["options"] = {**dict(fields.get("options") or {}), **opts}
    alloc = dict(fields.get("allocation", {}))
    layers_list = None
    if per_layer is not None:
        try:
            layers_list = [float(x) for x in per_layer.split(",")]
        except ValueError:
            raise PruneError(f"--per-layer must be comma-separated numbers, got {per_layer!r}.") from None
    rd_list = None
    if rd_grid is not None:
        try:
            rd_list = [float(x) for x in rd_grid.split(",") if x.strip()]
        except ValueError:
            raise PruneError(f"--rd-grid must be comma-separated sparsities, got {rd_grid!r}.") from None
    alloc.update({k: v for k, v in {"kind": allocation, "min_density": min_density, "owl_m": owl_m, "owl_lambda": owl_lambda,
                                    "per_layer": layers_list, "table": sensitivity_table, "rd_grid": rd_list,
                                    "rd_unit": rd_unit}.items() if v is not None})
    if alloc:
        fields["allocation"] = alloc
    if exclude:
        fields["exclude"] = list(exclude)
    cal = dict(fields.get("calibration", {}))
    if calib_batch_size is not None and calib_batch_size != "all":
        try:
            calib_batch_size = int(calib_batch_size)
        except ValueError:
            raise PruneError(f"--calib-batch-size must be a positive integer or 'all', got {calib_batch_size!r}.") from None
    cal.update({k: v for k, v in {"text": calib, "samples": calib_samples, "seqlen": seqlen, "seed": seed, "mode": calib_mode,
                                  "bos": bos, "batch_size": calib_batch_size, "precision": calib_precision}.items() if v is not None})
    if cal:
        fields["calibration"] = cal
    if recover is not None or recover_steps is not None:
        rcv = dict(fields.get("recovery") or {})
        rcv.update({k: v for k, v in {"method": recover, "steps": recover_steps}.items() if v is not None})
        fields["recovery"] = rcv
    st = dict(fields.get("structure") or {})
    st_flags = {"kinds": None if structure is None else [k.strip() for k in structure.split(",") if k.strip()],
                "sparsity": sparsity if structured else None, "criterion": criterion, "gqa": gqa, "remove_layers": remove_layers,
                "remove_sublayers": remove_sublayers, "sublayer_method": sublayer_method,
                "learn": learn, "rounds": rounds, "beta": beta, "lora_steps": lora_steps, "lora_lr": lora_lr,
                "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_batch_size": lora_batch_size, "gate_lr": gate_lr, "collaborative_prompt": True if collaborative_prompt else None,
                "global_rank": True if global_rank else None, "bias_compensation": True if bias_compensation else None}
    st.update({k: v for k, v in st_flags.items() if v is not None})
    if st:
        fields["structure"] = st
    ex = dict(fields.get("experts") or {})
    ex.update({k: v for k, v in {"method": experts, "keep": keep_experts, "sparsity": sparsity if by_experts else None,
                                 "allocation": experts_allocation, "recalibrate_steps": recalibrate_router}.items()
               if v is not None})
    if ex:
        fields["experts"] = ex
    dst = dict(fields.get("distill") or {})
    dst.update({k: v for k, v in {"steps": distill, "iterations": distill_iterations, "text": distill_text,
                                  "precision": distill_precision, "schedule": schedule,
                                  "adapt_amplitude": adapt_amplitude}.items() if v is not None})
    if dst:
        fields["distill"] = dst
    rec = Recipe.make(**fields)
    if not stream and (offload_dir is not None or out_format != "safetensors" or (resume and rec.distill is None)):
        flag = "--resume" if resume else "--offload-dir" if offload_dir is not None else "--format"
        raise PruneError(f"{flag} works with --stream (the model read from disk block by block){' or --distill' if resume else ''}; add it.")
    if stream and rec.distill is not None:
        raise PruneError("Distillation trains the whole model at once, which is not streamed; prune with --stream "
                         "first, or drop --distill.")
    if stream:
        _prune_streamed(model, out, rec, resume=resume, offload_dir=offload_dir, fmt=out_format, overwrite=overwrite,
                        device=device, progress=progress)
        return
    res = api.prune_run(model, out, rec, eval_text=eval_text, eval_windows=eval_windows, generations=generations,
                        ood_text=ood_text, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                        resume=resume)
    m, rep, ev_text = res.model, res.report, res.eval_text
    metrics = rep.metrics
    if rec.structure is not None:
        from prunekit.structure import summary_lines

        lines = summary_lines(rep)
    elif rec.experts is not None:
        from prunekit.structure.experts import summary_lines as expert_lines

        lines = expert_lines(rep)
    else:
        lines = rep.lines()
    for line in lines:
        print(line)
    if rec.distill is not None:
        d = rep.summary["distill"]
        print(f"distilled: {d['steps']} steps ({d['parts']} part(s), {d['tokens']:,} tokens, {d['precision']}) in "
              f"{d['seconds'] / 60:.1f} min, loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}"
              + (f"; resumed at step {d['resumed_at_step']}" if "resumed_at_step" in d else ""))
        if "journey" in rep.summary:
            print(f"journey: {rep.summary['journey']['average_params']:,.0f} parameters on average over the training steps")
    if ev_text is not None:
        print(
            f"perplexity  dense {metrics['perplexity_dense']:.2f}  ->  pruned {metrics['perplexity']:.2f}  "
            f"(top-1 agreement with dense {metrics['agreement']:.3f}; {ev_text}, evaluation split)"
        )
    if "ood" in metrics:
        o = metrics["ood"]
        print(f"out of domain: perplexity  dense {o['perplexity_dense']:.2f}  ->  pruned {o['perplexity']:.2f}  "
              f"(top-1 agreement {o['agreement']:.3f}; {o['text']}, which the training never saw: "
              f"{o['shared_13grams_with_training']} shared 13-grams)")
    if rec.structure is not None and rep.summary.get("format") == "prunekit":
        print(f"saved {out}  (not a stock {m.config.model_type} config: {rep.summary.get('format_reason')}; per-layer "
              f"sizes are in config.prunekit_layer_sizes, load with prunekit.load('{out}'), stock transformers refuses it)")
    elif rec.experts is not None and rep.summary.get("format") == "prunekit":
        print(f"saved {out}  (expert counts differ between layers, which a stock {m.config.model_type} config cannot "
              f"say: they are in config.prunekit_expert_counts; load with prunekit.load('{out}'))")
    elif rec.experts is not None:
        print(f"saved {out}  (a stock {m.config.model_type} config with {adapter_for(m).expert_count(m)} experts per "
              f"layer; load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    elif rec.structure is not None:
        print(f"saved {out}  (a stock {m.config.model_type} config: {_stock_sizes(m)}; load with "
              f"transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    else:
        print(f"saved {out}  (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")


def _prune_streamed(model, out, rec, *, resume, offload_dir, fmt, overwrite, device, progress) -> None:
    from prunekit.stream import prune_checkpoint

    _say(f"streaming {model} block by block: {rec.method} ({rec.pattern}, sparsity {rec.sparsity:g}, allocation "
         f"{rec.allocation.kind}){', resuming' if resume else ''} ...")
    rep = prune_checkpoint(model, out, rec, resume=resume, offload_dir=offload_dir, format=fmt, overwrite=overwrite,
                           device=device, progress=progress)
    for line in rep.lines():
        print(line)
    st = rep.summary["stream"]
    print(f"on disk {rep.summary['disk_bytes'] / 2**20:,.1f} MiB ({fmt}, stored dtype {st['stored_dtype']})"
          + (f"; resumed after block {st['resumed_at_block'] - 1}" if st.get("resumed_at_block") else ""))
    if fmt == "compressed-tensors":
        print(f"saved {out}  (compressed-tensors sparse layout; load with prunekit.load('{out}'); see docs for which "
              "serving stacks read it)")
    else:
        print(f"saved {out}  (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'); evaluate with "
              f"prunekit eval {out})")


def _stock_sizes(m) -> str:
    from prunekit.arch import adapter_for

    c, key = m.config, adapter_for(m).layout.intermediate_key
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return (f"{c.num_attention_heads} heads, {kv} kv heads, MLP width {getattr(c, key, None) or 'default'} ({key}), "
            f"hidden size {c.hidden_size}, {c.num_hidden_layers} layers")


@app.command()
def sensitivity(
    model: Annotated[str, typer.Argument(help="zoo name (smollm2-135m), model directory or hub id")],
    out: Annotated[Path, out_option("output directory: sensitivity.json (the table) and sensitivity.png")],
    method: Annotated[str, typer.Option(help="magnitude | wanda | sparsegpt | gblm")] = "wanda",
    grid: Annotated[str, typer.Option(help="comma-separated sparsities each unit is pruned to, alone")] = "0.2,0.4,0.6,0.8,0.9",
    unit: Annotated[str, typer.Option(help="block (a decoder block's layers together) | layer (one at a time)")] = "block",
    measure_: Annotated[str, typer.Option("--measure", help="perplexity (held-out; for --allocation sensitivity) | distortion (mean squared change of the logits on the calibration windows; for --allocation rd)")] = "perplexity",
    calib: Annotated[str, typer.Option(help="calibration text: shakespeare | pydoc | PATH.txt")] = "shakespeare",
    calib_samples: Annotated[int, typer.Option(help="calibration sequences")] = 32,
    seqlen: Annotated[int, typer.Option(help="tokens per calibration and evaluation window")] = 256,
    eval_text: Annotated[Optional[str], typer.Option(help="text whose evaluation split is scored (default: the calibration text)")] = None,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows of --seqlen tokens")] = 8,
    seed: Annotated[int, seed_option("seed of the calibration sampling")] = 0,
    overwrite: Overwrite = False,
    progress: Progress = True,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="allow a model directory's own code (auto_map) to run; only for code you have read")] = False,
) -> None:
    """Prune one decoder block (or layer) at a time to each sparsity of --grid, everything else dense, and record
    the held-out perplexity; `prunekit prune --allocation sensitivity --sensitivity-table OUT` then spreads a
    sparsity over the blocks from this table (cheapest first)."""
    start(progress, hf=True)
    from prunekit import io
    from prunekit.batches import resolve_bos
    from prunekit.checks import check_seqlen
    from prunekit.evaluate.sensitivity import sensitivity as measure
    if measure_ not in ("perplexity", "distortion"):
        raise PruneError(f"--measure must be perplexity or distortion, got {measure_!r}.")
    from prunekit.recipe import Recipe
    from prunekit.zoo import load_text

    try:
        values = [float(x) for x in grid.split(",") if x.strip()]
    except ValueError:
        raise PruneError(f"--grid must be comma-separated sparsities, got {grid!r}.") from None
    if eval_windows <= 0:
        raise PruneError(f"--eval-windows must be positive, got {eval_windows}.")
    rec = Recipe.make(method=method, calibration={"text": calib, "samples": calib_samples, "seqlen": seqlen, "seed": seed})
    io.check_output(out, overwrite, inputs=[model])
    load_text(calib, "calibration")
    _say(f"loading {model} ...")
    m, tok = io.load_any(model, trust_remote_code)
    check_seqlen(m, seqlen)
    bos = resolve_bos(tok, None)
    from prunekit.api import _windows_from_text

    cal = _windows_from_text(tok, calib, calib_samples, seqlen, seed, None) if rec.needs_data else None
    if measure_ == "distortion":  # the rd allocation's curves: on calibration windows, never the evaluation split
        if cal is None:
            cal = _windows_from_text(tok, calib, calib_samples, seqlen, seed, None)
        windows = cal[:eval_windows]
    else:
        windows = _load_windows(tok, eval_text or calib, "evaluation", seqlen, eval_windows, bos)
    _say(f"{measure_} of every {unit} under {method} at {', '.join(f'{v:g}' for v in values)} ...")
    t0 = time.perf_counter()
    table = measure(m, rec, cal, windows, values, unit=unit, progress=progress, measure=measure_)
    table.update(model=str(Path(model).resolve()) if Path(model).is_dir() else model, calibration=rec.calibration.model_dump(),
                 eval_text=eval_text or calib, seconds=time.perf_counter() - t0)
    with io.atomic_dir(io.check_output(out, overwrite)) as tmp:
        io.write_json(Path(tmp) / "sensitivity.json", table)
        _plot_sensitivity(table, Path(tmp) / "sensitivity.png")
    grid_keys = list(next(iter(table["units"].values()))[measure_])
    if measure_ == "perplexity":
        print(f"dense perplexity {table['perplexity_dense']:.3f}; perplexity with one {unit} pruned:")
    else:
        print(f"output distortion (mean squared change of the logits) with one {unit} pruned:")
    print(f"{unit:>24s}  " + "  ".join(f"{k:>8s}" for k in grid_keys))
    for name, row in table["units"].items():
        print(f"{name:>24s}  " + "  ".join(f"{row[measure_][k]:8.3g}" for k in grid_keys))
    kind = "sensitivity" if measure_ == "perplexity" else "rd"
    print(f"saved {out}/sensitivity.json in {table['seconds']:.0f} s (use it: prunekit prune {model} --allocation {kind} "
          f"--sensitivity-table {out} --sparsity 0.5 ...)")


def _plot_sensitivity(table: dict, path: Path) -> None:
    """Per unit: the perplexity increase over the grid, normalised by the largest increase of any unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = table.get("measure", "perplexity")
    dense = table.get("perplexity_dense", 0.0)
    rows = table["units"]
    top = max(max(v - dense for v in r[key].values()) for r in rows.values()) or 1.0
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, (name, r) in enumerate(rows.items()):
        xs = [0.0] + [float(k) for k in r[key]]
        ys = [0.0] + [(v - dense) / top for v in r[key].values()]
        ax.plot(xs, ys, color=cmap(i / max(len(rows) - 1, 1)), lw=1, label=name.rsplit(".", 1)[-1] if len(rows) <= 12 else None)
    ax.set_xlabel("sparsity of the one pruned unit")
    ax.set_ylabel(f"{key} increase / largest increase")
    ax.set_title(f"{table['method']} sensitivity per {table['unit']}" + (f" (dense ppl {dense:.2f}" if key == "perplexity" else " (")
                 + "; dark = first)")
    if len(rows) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="zoo name, model directory (e.g. a prunekit output) or hub id")],
    text: Annotated[str, typer.Option(help="shakespeare | pydoc | PATH.txt (its evaluation split)")] = "shakespeare",
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 256,
    windows: Annotated[int, typer.Option(help="number of non-overlapping windows (from the start)")] = 64,
    reference: Annotated[Optional[str], typer.Option(help="dense model to measure top-1 agreement against")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="comma-separated tasks of the lm-evaluation-harness: prunekit's offline kick-closed, kick-open, shakespeare-cloze, shakespeare-speaker, factoid, or any harness task name")] = None,
    limit: Annotated[Optional[float], typer.Option(help="at most this many documents per task (a fraction of each task when < 1)")] = None,
    fewshot: Annotated[Optional[int], typer.Option(help="few-shot examples per task document (default: the task's own)")] = None,
    batch_size: Annotated[int, typer.Option(help="task evaluation batch size")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help=_BOS_HELP)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="allow a model directory's own code (auto_map) to run; only for code you have read")] = False,
    progress: Progress = True,
) -> None:
    """Perplexity of MODEL on the evaluation split of TEXT, with its sparsity and size; with --tasks, task scores
    through the lm-evaluation-harness too (written into MODEL's prunekit.json when MODEL is a prunekit run)."""
    start(progress, hf=True)
    from prunekit import api, io
    from prunekit.batches import resolve_bos
    from prunekit.checks import check_finite, check_seqlen
    from prunekit.zoo import load_text

    if seqlen <= 0 or windows <= 0:
        raise PruneError("--seqlen and --windows must be positive integers.")
    if batch_size <= 0:
        raise PruneError(f"--batch-size must be positive, got {batch_size}.")
    task_names = None
    if tasks is not None:
        from prunekit.evaluate.tasks import parse_tasks, task_manager

        if limit is not None and limit <= 0:
            raise PruneError(f"--limit must be positive, got {limit:g}.")
        task_names = parse_tasks(tasks)
        task_manager(task_names)  # an unknown task fails here, before any loading
    elif limit is not None or fewshot is not None:
        raise PruneError("--limit and --fewshot apply to --tasks; name the tasks with --tasks.")
    load_text(text, "evaluation")  # an unknown text fails here, before any loading
    if reference is not None:
        from prunekit.zoo.models import resolve_model

        resolve_model(reference)  # a reference that cannot be found fails before the evaluation
    m, tok = io.load_any(model, trust_remote_code)
    check_finite(m)
    check_seqlen(m, seqlen)
    bos_token = resolve_bos(tok, bos)
    w = _load_windows(tok, text, "evaluation", seqlen, windows, bos_token)
    t0 = time.perf_counter()
    res = api.evaluate(m, w, progress=True)
    res["eval_s"] = time.perf_counter() - t0
    if reference is not None:
        ref_model, _ = io.load_any(reference, trust_remote_code)
        check_finite(ref_model, f"The reference {reference}")
        from prunekit.evaluate import agreement, score_windows

        res["agreement"] = agreement(score_windows(ref_model, w)[1], score_windows(m, w)[1])
        res["reference"] = reference
    res.update({"text": text, "windows": int(w.shape[0]), "seqlen": seqlen, "bos": bos_token is not None})
    man = io.read_manifest(model) if Path(model).is_dir() else None
    if task_names:
        from prunekit.evaluate.tasks import record_tasks, run_tasks

        _say(f"tasks {', '.join(task_names)} (lm-evaluation-harness) ...")
        t0 = time.perf_counter()
        lim = int(limit) if limit is not None and limit >= 1 else limit
        res["tasks"] = run_tasks(m, tok, task_names, limit=lim, batch_size=batch_size, num_fewshot=fewshot)
        res["tasks_s"] = time.perf_counter() - t0
        if man:
            record_tasks(model, res["tasks"], {"limit": lim, "fewshot": fewshot})
    if man:
        res["recipe"] = man.get("recipe")
    if as_json:
        print(json.dumps(res, indent=2))
        return
    print(f"{model}: perplexity {res['perplexity']:.3f} on {text} ({res['windows']} x {seqlen} tokens"
          + (", each window starting with the begin-of-sequence token)" if res["bos"] else ")"))
    print(f"sparsity of block linear layers {res['sparsity']:.4f}  params {res['params']:,}  non-zeros {res['nonzeros']:,}")
    if "agreement" in res:
        print(f"top-1 next-token agreement with {reference}: {res['agreement']:.4f}")
    if task_names:
        from prunekit.evaluate.tasks import lines as task_lines

        print("\n".join(task_lines(res["tasks"])))
        if man:
            print(f"task scores written into {Path(model) / io.MANIFEST}")
    if man:
        r = man.get("recipe", {})
        print(f"pruned by prunekit: {r.get('method')} {r.get('pattern')} sparsity {r.get('sparsity')}")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories: prunekit prune --out DIRs (prunekit.json) and prunekit sensitivity --out DIRs (sensitivity.json)", show_default=False)],
    out: Annotated[Path, out_option("the HTML file to write (self-contained: opens offline in any browser)")],
    title: Annotated[Optional[str], typer.Option(help="the page's title (default: the run names)")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Compare RUNS side by side on one self-contained HTML page: a table (method, pattern, sparsity, perplexity,
    agreement, task scores, sizes, speed, times; failed runs with their error), plots, generations, and each run's
    recipe with the command that re-runs it."""
    start(progress)
    from prunekit import io
    from prunekit.evaluate.html_report import build_report, is_report

    io.check_output_file(out, overwrite, ".html", is_ours=is_report)
    _say(f"reading {len(runs)} run(s) and drawing the plots ...")
    path = build_report(runs, out, title=title)
    print(f"saved {path}  ({len(runs)} run(s), {path.stat().st_size / 1024:,.0f} KiB; open it in any browser, it "
          "needs no network)")


@app.command()
def bench(
    grid_file: Annotated[Path, typer.Argument(help="YAML/JSON grid file: model, base, axes, runs, evaluation, tasks, speed, keep_models, threads (README: Benchmark grids)", show_default=False)],
    out: Annotated[Optional[Path], out_option("the grid's directory: a run directory per entry, grid.json, grid.md, report.html (default: the grid file's out)")] = None,
    engine: Annotated[str, typer.Option(help="local (one run at a time, in this process) | ray (one Ray task per run; local Ray unless --ray-address)")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="--engine ray: a Ray cluster address, e.g. ray://host:10001 (OUT must be on storage every node shares)")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write OUT/report.html of every run (prunekit report)")] = True,
    overwrite: Annotated[bool, typer.Option(help="redo runs that are complete (default: they are skipped, so an interrupted grid resumes)")] = False,
    progress: Progress = True,
) -> None:
    """Run a grid of pruning runs (methods x sparsities x patterns x allocations x recovery, ...) from GRID_FILE: every
    entry validated first, each run what `prunekit prune` does (+ tasks, speed), a failed run recorded and the rest
    go on; grid.json and grid.md hold one row per run. Exit 1 when a run failed (its error is in its row)."""
    start(progress, hf=True)
    from prunekit.grid import load_grid, run_grid

    grid = load_grid(grid_file)
    try:
        res = run_grid(grid, out, engine=engine, address=ray_address, overwrite=overwrite, report=report,
                       source=grid_file, echo=print)
    except KeyboardInterrupt:
        _say("interrupted; the runs that finished are kept: run the same command again to continue")
        raise SystemExit(130) from None
    counts = f"{res.ok} ok" + (f", {res.failed} failed" if res.failed else "") + (
        f" ({res.skipped} done before, skipped)" if res.skipped else "")
    print(f"{len(res.rows)} run(s): {counts}; saved {res.json_path} and {res.md_path}"
          + (f"; report {res.report_path}" if res.report_path else ""))
    if res.failed:
        raise typer.Exit(1)


@app.command()
def recover(
    pruned: Annotated[str, typer.Argument(help="pruned model: a prunekit output directory, any model directory, zoo name or hub id")],
    out: Annotated[Path, out_option("output directory (must not exist unless --overwrite)")],
    method: Annotated[Optional[str], typer.Option(help="perp (norms, biases, masked LoRA) | lora | full | distill")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default 100)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (default 2e-4; 10% warmup, cosine decay)")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank (default 8)")] = None,
    lora_ranks: Annotated[Optional[str], typer.Option(help="LoRA rank per decoder block: uniform (default) | importance (CFSP's IG-LoRA: in proportion to each block's angular-distance importance, the same total)")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default 16)")] = None,
    text: Annotated[Optional[str], typer.Option(help="training text, its calibration split: shakespeare | pydoc | PATH.txt")] = None,
    samples: Annotated[Optional[int], typer.Option(help="training sequences drawn from the text (default 128)")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="tokens per sequence, also of the evaluation windows (default 256)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="sequences per step (default 4)")] = None,
    distill_weight: Annotated[Optional[float], typer.Option(help="distill: weight of the KL term in [0, 1] (default 0.5)")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="distill: softmax temperature (default 1)")] = None,
    select: Annotated[Optional[str], typer.Option(help="which of the --samples windows to train on (the same --steps): all (default) | random | paser (MiniLM clusters, budgets by the pruned model's divergence from the dense teacher, near duplicates skipped)")] = None,
    keep: Annotated[Optional[float], typer.Option(help="with --select random / paser: the share of the windows selected, (0, 1] (default 1)")] = None,
    clusters: Annotated[Optional[int], typer.Option(help="--select paser: k-means clusters of the windows (default 8, at most --samples)")] = None,
    dedup_threshold: Annotated[Optional[float], typer.Option(help="--select paser: skip a window whose cosine similarity to a selected one is above this, (0, 1] (default 0.95)")] = None,
    seed: Annotated[Optional[int], seed_option("seed of the sampling, batch order and LoRA init")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="distill / --select paser: the dense model (default: the source in PRUNED's prunekit.json)")] = None,
    eval_text: Annotated[Optional[str], typer.Option(help="text for before/after perplexity (default: --text's evaluation split); 'none' skips")] = None,
    eval_windows: Annotated[int, typer.Option(help="evaluation windows of --seqlen tokens")] = 16,
    ood_text: Annotated[Optional[str], typer.Option(help="a text the training never saw, also evaluated (default: pydoc after shakespeare, else shakespeare); 'none' skips")] = None,
    recipe: Annotated[Optional[Path], recipe_option("YAML/JSON recovery settings, or an LLM recipe whose recovery section is used; flags given here override it")] = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
    bos: Annotated[Optional[bool], typer.Option("--bos/--no-bos", help=_BOS_HELP)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="allow a model directory's own code (auto_map) to run; only for code you have read")] = False,
) -> None:
    """Train a pruned model briefly to win back quality; every pruned weight stays exactly zero."""
    start(progress, hf=True)
    from prunekit import api, io
    from prunekit.batches import calibration_batches, resolve_bos, tokenize
    from prunekit.checks import check_seqlen
    from prunekit.train import make_recovery, pruning_masks
    from prunekit.train import recover as run_recovery
    from prunekit.zoo import load_text

    # typer turns Ctrl-C into a returned 130 that `app(standalone_mode=False)` drops; exit 130 here instead
    try:
        flags = {"method": method, "steps": steps, "lr": lr, "lora_rank": lora_rank, "lora_ranks": lora_ranks, "lora_alpha": lora_alpha, "text": text,
                 "samples": samples, "seqlen": seqlen, "batch_size": batch_size, "distill_weight": distill_weight,
                 "temperature": temperature, "seed": seed, "select": select, "keep": keep, "clusters": clusters,
                 "dedup_threshold": dedup_threshold}
        fields = {}
        if recipe is not None:
            from prunekit.core.config import read_mapping

            fields = read_mapping(recipe, "Recipe")
            if isinstance(fields.get("recovery"), dict):  # a whole LLM recipe: its recovery section
                fields = fields["recovery"]
        rec = make_recovery(**{**fields, **{k: v for k, v in flags.items() if v is not None}})
        if eval_windows <= 0:
            raise PruneError(f"--eval-windows must be positive, got {eval_windows}.")
        io.check_output(out, overwrite, inputs=[pruned, teacher])
        manifest = io.read_manifest(pruned) if Path(pruned).is_dir() else None
        teacher_name = None
        if rec.method == "distill" or rec.select == "paser":  # paser: the pruned model's divergence from the dense one
            teacher_name = teacher or (manifest or {}).get("source")
            if not teacher_name:
                who = "Method distill" if rec.method == "distill" else "Select paser"
                raise PruneError(f"{who} needs the dense model as teacher; pass --teacher MODEL (the input has no prunekit.json naming its source).")
            if rec.select == "paser":
                from prunekit.zoo.minilm import minilm_path

                minilm_path()  # paser embeds the windows with MiniLM: missing, it fails before any loading
        elif teacher is not None:
            raise PruneError(f"--teacher is only used by --method distill or --select paser, not {rec.method} with --select "
                             f"{rec.select}; drop --teacher or use one of those.")
        if teacher_name:
            from prunekit.zoo.models import resolve_model

            resolve_model(teacher_name)  # a teacher that cannot be found fails before any loading
        train_text = load_text(rec.text, "calibration")  # an unknown text fails here, before any loading
        ev_text = rec.text if eval_text is None else eval_text
        if ev_text != "none":
            load_text(ev_text, "evaluation")
        from prunekit.zoo.text import out_of_domain, shared_ngrams

        ood = out_of_domain(rec.text) if ood_text is None else ood_text
        ood = None if ood == "none" else ood
        if ood is not None:
            load_text(ood, "evaluation")
        ref_name = teacher_name or (manifest or {}).get("source")  # the dense model, for top-1 agreement
        if ref_name:
            from prunekit.zoo.models import resolve_model

            try:
                resolve_model(ref_name)
            except PruneError:
                _say(f"the dense source {ref_name} named in prunekit.json is not here: no agreement is measured")
                ref_name = None

        t0 = time.perf_counter()
        _say(f"loading {pruned} ...")
        m, tok = io.load_any(pruned, trust_remote_code)
        check_seqlen(m, rec.seqlen)
        structured = bool(((manifest or {}).get("recipe") or {}).get("structure"))
        pruning_masks(m, structured)  # an unpruned model fails here, before any training
        t_model = None
        if teacher_name:
            _say(f"loading teacher {teacher_name} ...")
            t_model, _ = io.load_any(teacher_name, trust_remote_code)
        times = {"load_s": time.perf_counter() - t0}
        bos_token = resolve_bos(tok, bos)
        batches = calibration_batches(tokenize(tok, train_text), rec.samples, rec.seqlen, rec.seed,
                                      what=f"text {rec.text!r}", bos=bos_token)
        sets = {}
        if ev_text != "none":
            sets[ev_text] = _load_windows(tok, ev_text, "evaluation", rec.seqlen, eval_windows, bos_token)
        if ood is not None and ood not in sets:
            sets[ood] = _load_windows(tok, ood, "evaluation", rec.seqlen, eval_windows, bos_token)
        dense = {}
        if ref_name and sets:
            ref_model = t_model
            if ref_model is None:
                _say(f"loading the dense model {ref_name} for top-1 agreement ...")
                ref_model, _ = io.load_any(ref_name, trust_remote_code)
            dense = {name: api.reference(ref_model, tok, w, 0) for name, w in sets.items()}
            del ref_model

        def measure(model, when):
            out = {}
            for name, w in sets.items():
                if name in dense:
                    r = api.compare(model, tok, w, dense[name])[0]
                    out[name] = {f"perplexity_{when}": r["perplexity"], f"agreement_{when}": r["agreement"],
                                 "perplexity_dense": r["perplexity_dense"]}
                else:
                    out[name] = {f"perplexity_{when}": api.evaluate(model, w)["perplexity"]}
            return out

        metrics = {}
        by_text: dict[str, dict] = {name: {} for name in sets}
        if sets:
            t0 = time.perf_counter()
            _say(f"before recovery on {', '.join(sets)} ({eval_windows} x {rec.seqlen} tokens each) ...")
            for name, v in measure(m, "before").items():
                by_text[name].update(v)
            times["eval_before_s"] = time.perf_counter() - t0
        _say(f"training: {rec.method}, {rec.steps} steps of {rec.batch_size} x {rec.seqlen} tokens, lr {rec.lr:g} ...")
        m, stats = run_recovery(m, rec, batches, teacher=t_model, tokenizer=tok, structured=structured, progress=True)
        del t_model
        if sets:
            t0 = time.perf_counter()
            for name, v in measure(m, "after").items():
                by_text[name].update(v)
            times["eval_after_s"] = time.perf_counter() - t0
        seen = train_text  # the recovery text, and the text the pruning calibrated on when its record says
        cal_text = (((manifest or {}).get("recipe") or {}).get("calibration") or {}).get("text")
        if cal_text and cal_text != rec.text:
            try:
                seen += "\n" + load_text(cal_text, "calibration")
            except PruneError:
                pass
        for name, v in by_text.items():
            v["shared_13grams_with_training"] = shared_ngrams(seen, load_text(name, "evaluation"))
        if ev_text in by_text:
            metrics.update(by_text[ev_text])
        if ood in by_text:
            metrics["ood"] = {"text": ood, **by_text[ood]}
        windows = sets.get(ev_text)

        data = {k: v for k, v in (manifest or {}).items() if k != "versions"}
        data["recovery"] = {"input": pruned, "teacher": teacher_name, "recipe": rec.model_dump(), "bos": bos_token is not None, "stats": stats,
                            "metrics": {**metrics, "text": ev_text, "windows": 0 if windows is None else int(windows.shape[0])},
                            "timings": times}
        io.save(m, tok, out, data, overwrite=overwrite)
        print(f"recovery {rec.method}: {stats['steps']} steps in {stats['seconds']:.1f}s, {stats['trainable_params']:,} trainable "
              f"parameters, training loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}")
        sel = stats["selection"]
        if sel["select"] != "all":
            extra = (f"; {len(sel['per_cluster'])} clusters, budgets {[c['budget'] for c in sel['per_cluster']]} by mean divergence "
                     f"{[round(c['degradation'], 4) for c in sel['per_cluster']]}, {sel['near_duplicates_skipped']} near duplicates skipped"
                     if "per_cluster" in sel else "")
            print(f"selection {sel['select']}: {sel['selected']} of {sel['candidates']} windows{extra}")
        for name, v in by_text.items():
            agree = (f", top-1 agreement with the dense model {v['agreement_before']:.3f} -> {v['agreement_after']:.3f}"
                     if "agreement_after" in v else "")
            where = "evaluation split" if name == rec.text else f"out of domain, {v['shared_13grams_with_training']} shared 13-grams"
            print(f"perplexity  pruned {v['perplexity_before']:.2f}  ->  recovered {v['perplexity_after']:.2f}"
                  + (f" (dense {v['perplexity_dense']:.2f})" if "perplexity_dense" in v else "") + f"{agree}  ({name}, {where})")
        print(f"saved {out}  (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
    except KeyboardInterrupt:
        _say("interrupted; nothing was written")
        raise SystemExit(130) from None


# vision and training-time pruning (issue 6)
from prunekit.vision.cli import train_prune as _vision_train_prune  # noqa: E402

app.command("train-prune")(_vision_train_prune)
from prunekit.vision.compare import compare as _vision_compare  # noqa: E402

app.command("compare")(_vision_compare)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. The one place where errors become exit codes: a user's mistake is one line on stderr and exit 2,
    Ctrl-C is exit 130 with nothing written; anything else is a bug in prunekit and keeps its traceback."""
    import signal
    import warnings

    def one_line_warning(message, category, *_args, **_kw):
        print(f"warning: {_one_line(message)}", file=sys.stderr, flush=True)

    rc = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", FutureWarning)
            warnings.showwarning = one_line_warning
            out = app(args=argv, standalone_mode=False)
        if isinstance(out, int) and out:  # typer returns 130 for a Ctrl-C it caught
            rc = out
            if rc == 130:
                print("interrupted; nothing was written", file=sys.stderr)
    except PruneError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        rc = 130
    except typer.Exit as e:
        rc = e.exit_code
    except Exception as e:
        # usage errors of typer's (vendored) click: one line, exit 2
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {_one_line(e.format_message())} (see --help)", file=sys.stderr)
            rc = e.exit_code if isinstance(e.exit_code, int) and e.exit_code else 2
        elif type(e).__name__ == "Abort":
            print("interrupted; nothing was written", file=sys.stderr)
            rc = 130
        else:
            raise
    finally:
        if argv is None:  # the process ends here: a Ctrl-C now must not interrupt the interpreter's clean-up
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(rc)


if __name__ == "__main__":
    main()
