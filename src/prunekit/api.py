"""The Python API: ``prune(model, recipe, calibration_batches) -> (model, Report)`` and ``evaluate``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunekit.arch import adapter_for, target_layers, untargeted_weights
from prunekit.batches import starts_with_bos
from prunekit.calibrate import run_sequential
from prunekit.checks import check_device, check_finite
from prunekit.core.allocate import keep_counts, owl_ratio
from prunekit.errors import PruneError
from prunekit.evaluate import agreement, greedy, layer_sparsity, perplexity, prompts_from, score_windows, size_summary
from prunekit.linear import in_features, weight_matrix
from prunekit.methods import get_method
from prunekit.recipe import Recipe
from prunekit.report import Report


def _check_targets(per_block: list[list[tuple[str, nn.Module]]], recipe: Recipe) -> list[tuple[str, nn.Module]]:
    flat = [t for block in per_block for t in block]
    if not flat:
        raise PruneError("No layer is left to prune: the --exclude patterns match every linear layer of the blocks.")
    nm = recipe.nm
    if nm is not None:
        for name, mod in flat:
            if in_features(mod) % nm[1]:
                raise PruneError(
                    f"Pattern {recipe.pattern} needs each layer's input size divisible by {nm[1]}, but {name} has "
                    f"{in_features(mod)} inputs; choose another M or --exclude that layer."
                )
    return flat


def _dense_importance(model, adapter, per_block, method, batches, recipe, device, progress, stream=None,
                      reduce=None) -> dict[str, torch.Tensor]:
    """The criterion's importance of every target weight, from the dense model (one forward pass).

    ``reduce(block_scores) -> summary``: keep only a summary per block (OWL's outlier ratio), so a streamed model's
    scores never all sit in memory; the result is then ``{block index: summary}``."""
    if method.statistic is None and stream is None:
        return {name: method.importance(weight_matrix(m), None, name) for block in per_block for name, m in block}
    out: dict = {}
    pending: dict[str, torch.Tensor] = {}

    def record(bi, group, stat):
        for name, m in group:
            pending[name] = method.importance(weight_matrix(m), stat, name)
        if all(n in pending for n, _ in per_block[bi]):  # the block is complete (in the order its groups came)
            block = dict(pending)
            pending.clear()
            if reduce is not None:
                out[bi] = reduce(block)
            else:
                out.update(block)

    if method.statistic is None:  # data-free, streamed: read each block, score it
        reader = stream.reader()
        for bi, block in enumerate(per_block):
            reader.load(bi)
            record(bi, block, None)
            reader.free(bi)
        return out
    run_sequential(
        model, adapter.blocks(model), per_block, batches, "sqnorm", record,
        batch_size=recipe.calibration.batch_size, device=device, progress=progress,
        desc="allocation statistics", propagate=False, stream=None if stream is None else stream.reader(),
        precision=recipe.calibration.precision,
    )
    return out


def _allocate(recipe, model, adapter, per_block, flat, method, batches, device, progress, stream=None) -> dict[str, int] | None:
    """Exact number of weights each target layer loses (None for N:M), from the shared allocator.

    Streamed (``stream``), OWL keeps one outlier ratio per block, never all scores; global and LAMP rank all
    scores at once, which must fit in memory (checked)."""
    if recipe.nm is not None:
        return None
    a, s = recipe.allocation, recipe.sparsity
    groups = {name: bi for bi, block in enumerate(per_block) for name, _ in block}
    ratios = None
    if a.kind == "owl" and stream is not None:
        ratios = _dense_importance(model, adapter, per_block, method, batches, recipe, device, progress, stream,
                                   reduce=lambda block: owl_ratio(torch.cat([v.flatten() for v in block.values()]), a.owl_m))
        scores = {name: weight_matrix(m) for name, m in flat}  # meta tensors: only the shapes
    elif a.kind in ("global", "owl", "lamp"):
        if stream is not None:
            from prunekit.stream import check_scores_fit

            check_scores_fit(sum(weight_matrix(m).numel() for _, m in flat), a.kind)
        scores = _dense_importance(model, adapter, per_block, method, batches, recipe, device, progress, stream)
    else:  # only the shapes matter
        scores = {name: weight_matrix(m) for name, m in flat}
    kind, per_group, curves, grid = a.kind, a.per_layer, None, None
    if kind == "rd":  # measured output-distortion curves, solved by dynamic programming (core.allocate.rd_sparsities)
        from prunekit.evaluate.sensitivity import read_table, rd_curves, sensitivity

        if a.table:
            table = read_table(a.table)
        else:
            if stream is not None:
                raise PruneError("Allocation rd measures every unit of the whole model in memory; with --stream give "
                                 "the table of prunekit sensitivity --measure distortion.")
            if batches is None:
                raise PruneError("Allocation rd measures output distortion on calibration windows; pass calibration_batches.")
            table = sensitivity(model, recipe, batches, batches[: a.rd_windows], a.rd_grid, unit=a.rd_unit,
                                device=device, progress=progress, measure="distortion")
        curves, grid, unit = rd_curves(table, len(per_block), adapter.blocks_path, [n for n, _ in flat])
        if unit == "layer":
            groups = None
    if kind == "sensitivity":  # the measured table, turned into one sparsity per decoder block
        from prunekit.evaluate.sensitivity import block_sparsities, read_table

        kind, per_group = "list", block_sparsities(read_table(a.table), len(per_block), adapter.blocks_path, s,
                                                   a.max_deviation)
    keep = keep_counts(scores, s, kind, min_density=a.min_density, groups=groups, slack="removed", owl_m=a.owl_m,
                       owl_lambda=a.owl_lambda, per_group=per_group, owl_ratios=ratios, rd_curves=curves, rd_grid=grid)
    del scores
    return {name: weight_matrix(m).numel() - keep[name] for name, m in flat}


def _record_bos(model: nn.Module, recipe: Recipe, batches, bos: int | None = None) -> Recipe:
    """The recipe as it is recorded: ``calibration.bos`` says whether the calibration windows start with BOS
    (``bos``: the tokenizer's id when known, else the model config's)."""
    if not (isinstance(batches, torch.Tensor) and batches.dim() == 2):
        return recipe
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    used = starts_with_bos(batches, bos if isinstance(bos, int) else None)
    if recipe.calibration.bos is not None and recipe.calibration.bos != used:
        raise PruneError(
            f"The recipe says calibration.bos {recipe.calibration.bos} but the calibration batches "
            f"{'do' if used else 'do not'} start with the begin-of-sequence token; build them with "
            "calibration_batches(..., bos=bos_id(tokenizer)) or drop calibration.bos."
        )
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"bos": used})})


def resolve_chunks(model: nn.Module, recipe: Recipe, batches, device="cpu") -> Recipe:
    """The recipe with ``calibration.batch_size: all`` replaced by the number of sequences per forward pass that
    was used (:func:`prunekit.calibrate.resolve_batch_size`), so that the recorded recipe repeats the run."""
    want = recipe.calibration.batch_size
    if want != "all":
        return recipe
    from prunekit.calibrate import resolve_batch_size
    from prunekit.core.progress import say

    n = resolve_batch_size(model, batches if isinstance(batches, torch.Tensor) else None, want, device)
    if isinstance(batches, torch.Tensor) and n < batches.shape[0]:
        say(f"calibration batch_size 'all': {batches.shape[0]} sequences do not fit in memory at once; {n} per pass")
    return recipe.model_copy(update={"calibration": recipe.calibration.model_copy(update={"batch_size": n})})


def _windows_from_text(tokenizer, text: str, samples: int, seqlen: int, seed: int, bos_flag: bool | None) -> torch.Tensor:
    from prunekit.batches import calibration_batches as draw
    from prunekit.batches import resolve_bos, tokenize
    from prunekit.zoo import load_text

    return draw(tokenize(tokenizer, load_text(text, "calibration")), samples, seqlen, seed, what=f"text {text!r}",
                bos=resolve_bos(tokenizer, bos_flag))


def prune(
    model: nn.Module,
    recipe: Recipe | dict | None = None,
    calibration_batches: torch.Tensor | None = None,
    *,
    tokenizer=None,
    recovery_batches: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    after_prune=None,
    device: str = "cpu",
    progress: bool = True,
    distill_batches: torch.Tensor | None = None,
    work_dir=None,
    resume: bool = False,
    general_batches: torch.Tensor | None = None,
) -> tuple[nn.Module, Report]:
    """Prune ``model`` in place as ``recipe`` says and return it with a :class:`Report`; every section of the
    recipe is carried out, and the recorded recipe says what was used.

    With a ``structure`` section the pruning is structured: heads, MLP channels or layers are removed and the
    model's tensors shrink (see :mod:`prunekit.structure`). With a ``recovery`` section the pruned model is then
    trained with its zeros kept (:func:`prunekit.train.recover`).

    ``calibration_batches``: int64 token ids ``[samples, seqlen]``, needed by data-driven methods (wanda,
    sparsegpt, gblm); see :func:`prunekit.batches.calibration_batches`. Without them, ``tokenizer`` draws them
    from ``recipe.calibration`` (text, samples, seqlen, seed, bos). ``recovery_batches`` likewise for the recovery
    (default: drawn from ``recipe.recovery.text`` with ``tokenizer``); ``teacher``: the dense model for recovery
    method distill (default: a copy of ``model`` taken before pruning). ``after_prune(model, report)`` runs
    between pruning and recovery (the CLI measures the one-shot perplexity there).

    With a ``distill`` section the pruning is followed by distillation from the dense ``teacher`` (every weight
    trained, zeros kept; iteratively for a structure section), see :func:`prunekit.train.distill.compress_and_distill`:
    ``distill_batches`` default to windows of ``recipe.distill.text`` drawn with ``tokenizer``; ``work_dir`` keeps
    resumable checkpoints, ``resume`` continues them. The returned model is then the distilled student (a new
    object when a checkpoint was resumed).

    ``general_batches``: method d-pruner's general-text windows (default: drawn with ``tokenizer`` from its
    ``options.general_text``, else the bundled text that is not the calibration text).
    """
    if recipe is None:
        recipe = Recipe()
    elif isinstance(recipe, dict):
        recipe = Recipe.make(**recipe)
    check_device(device)
    check_finite(model)
    cal = recipe.calibration
    bos = None
    if tokenizer is not None:
        from prunekit.batches import resolve_bos

        bos = resolve_bos(tokenizer, cal.bos)
    if calibration_batches is None and recipe.needs_data and tokenizer is not None:
        calibration_batches = _windows_from_text(tokenizer, cal.text or "shakespeare", cal.samples, cal.seqlen, cal.seed, cal.bos)
    elif calibration_batches is not None:  # token ids given: their source text is not known
        if not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
            raise PruneError("calibration_batches must be a 2-D tensor of token ids [samples, seqlen].")
        n, seqlen = calibration_batches.shape
        recipe = recipe.model_copy(update={"calibration": cal.model_copy(update={
            "text": None if "text" not in cal.model_fields_set else cal.text, "samples": int(n), "seqlen": int(seqlen)})})
    recipe = _record_bos(model, recipe, calibration_batches, bos)
    recipe = resolve_chunks(model, recipe, calibration_batches, device)
    if recipe.method == "d-pruner" and general_batches is None and recipe.options.get("lam", 0) > 0:
        if tokenizer is None:
            raise PruneError("D-Pruner needs windows of its general text: pass tokenizer= or general_batches=.")
        from prunekit.zoo.text import out_of_domain

        o = recipe.options
        text = o.get("general_text") or out_of_domain(cal.text or "shakespeare")
        general_batches = _windows_from_text(tokenizer, text, o["general_samples"], recipe.calibration.seqlen, cal.seed,
                                             cal.bos)
        recipe = recipe.model_copy(update={"options": {**o, "general_text": text}})
    rec = recipe.recovery
    if rec is not None:
        if recovery_batches is None and tokenizer is None:
            raise PruneError("The recipe has a recovery section: pass tokenizer= (its text is drawn from "
                             "recovery.text) or recovery_batches=, or drop the section.")
        needs_teacher = rec.method == "distill" or rec.select == "paser"  # paser: divergence from the dense model
        if not needs_teacher and teacher is not None:
            raise PruneError(f"A teacher is only used by recovery method distill and select paser, not {rec.method} "
                             f"with select {rec.select}.")
        if rec.select == "paser" and tokenizer is None:
            raise PruneError("Recovery select paser embeds the text of each recovery window; pass tokenizer=.")
        if needs_teacher and teacher is None:
            import copy

            teacher = copy.deepcopy(model)
        if recovery_batches is None:
            recovery_batches = _windows_from_text(tokenizer, rec.text, rec.samples, rec.seqlen, rec.seed, recipe.calibration.bos)
    if recipe.distill is not None:
        from prunekit.train.distill import compress_and_distill

        d = recipe.distill
        if distill_batches is None:
            if tokenizer is None:
                raise PruneError("The recipe has a distill section: pass tokenizer= (its text is drawn from "
                                 "distill.text) or distill_batches=, or drop the section.")
            distill_batches = _windows_from_text(tokenizer, d.text, d.samples, d.seqlen, d.seed, recipe.calibration.bos)
        return compress_and_distill(model, recipe, calibration_batches, distill_batches, teacher=teacher,
                                    work_dir=work_dir, resume=resume, after_prune=after_prune, device=device,
                                    progress=progress)
    model, report = _prune_only(model, recipe, calibration_batches, device, progress, general_batches=general_batches)
    if rec is not None:
        from prunekit.train import recover

        if after_prune is not None:
            after_prune(model, report)
        t0 = time.perf_counter()
        model, stats = recover(model, rec, recovery_batches, teacher=teacher, tokenizer=tokenizer,
                               structured=recipe.structure is not None, progress=progress)
        report.times["recovery_s"] = time.perf_counter() - t0
        report.summary["recovery"] = stats
        layers = [t for block in target_layers(model, adapter_for(model)) for t in block]
        report.layers = layer_sparsity(layers)
        report.summary.update(size_summary(model, layers))
    return model, report


def _prune_only(model, recipe: Recipe, calibration_batches, device, progress, stream=None,
                general_batches=None) -> tuple[nn.Module, Report]:
    """Prune in place; ``stream`` (:class:`prunekit.stream.BlockStream`): ``model`` is a skeleton whose blocks
    are read from disk, pruned and written one at a time (the same selection, bit for bit)."""
    if recipe.structure is not None:  # heads / MLP channels / layers removed for real (prunekit.structure)
        from prunekit.structure import prune_structured

        return prune_structured(model, recipe, calibration_batches, device=device, progress=progress)
    if recipe.experts is not None:  # whole experts removed or merged (prunekit.structure.experts)
        from prunekit.structure.experts import prune_experts

        return prune_experts(model, recipe, calibration_batches, device=device, progress=progress)
    adapter = adapter_for(model)
    per_block = target_layers(model, adapter, recipe.exclude)
    flat = _check_targets(per_block, recipe)
    method = get_method(recipe.method, recipe.options)
    if recipe.allocation.kind == "sensitivity":  # a table that does not fit fails before any work
        from prunekit.evaluate.sensitivity import block_sparsities, read_table

        block_sparsities(read_table(recipe.allocation.table), len(per_block), adapter.blocks_path, recipe.sparsity,
                         recipe.allocation.max_deviation)
    if recipe.allocation.kind == "list":  # a list of the wrong length fails before any work
        keep_counts({n: weight_matrix(m) for n, m in flat}, recipe.sparsity, "list",
                    groups={n: bi for bi, block in enumerate(per_block) for n, _ in block}, per_group=recipe.allocation.per_layer)
    if method.statistic is not None:
        if calibration_batches is None:
            raise PruneError(f"Method {recipe.method} needs calibration data; pass calibration_batches (token ids).")
        if not (isinstance(calibration_batches, torch.Tensor) and calibration_batches.dim() == 2):
            raise PruneError("calibration_batches must be a 2-D tensor of token ids [samples, seqlen].")

    times: dict[str, float] = {}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    if general_batches is not None:  # d-pruner's general-text windows
        method.general_batches = general_batches
    if stream is None:
        method.prepare(model, calibration_batches, flat, progress)
    if time.perf_counter() - t0 > 1e-3:
        times["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if stream is not None and "counts" in stream.state:  # resumed: the allocation of the interrupted run
        counts = stream.state["counts"]
    else:
        counts = _allocate(recipe, model, adapter, per_block, flat, method, calibration_batches, device, progress, stream)
        if stream is not None:
            stream.save_counts(counts)
    if recipe.allocation.kind != "uniform":
        times["allocate_s"] = time.perf_counter() - t0

    def count_list(group):
        return None if counts is None else [counts[n] for n, _ in group]

    if method.statistic is None and stream is not None:
        from prunekit.core.progress import bar

        with torch.no_grad():
            for bi in bar(range(stream.first, len(per_block)), desc=f"{recipe.method} {recipe.pattern}", unit="block",
                          enabled=progress):
                stream.load(bi)
                for name, m in per_block[bi]:
                    method.prune_group([weight_matrix(m)], None, count_list([(name, m)]), recipe.nm, [name])
                stream.done(bi, None)
    elif method.statistic is None:
        with torch.no_grad():
            for name, m in flat:
                method.prune_group([weight_matrix(m)], None, count_list([(name, m)]), recipe.nm, [name])
    else:

        def on_group(_bi, group, stat):
            method.prune_group(
                [weight_matrix(m) for _, m in group], stat, count_list(group), recipe.nm, [n for n, _ in group]
            )

        phase = run_sequential(
            model,
            adapter.blocks(model),
            per_block,
            calibration_batches,
            method.statistic,
            on_group,
            batch_size=recipe.calibration.batch_size,
            device=device,
            progress=progress,
            desc=f"{recipe.method} {recipe.pattern}",
            propagate=recipe.calibration.mode == "sequential",
            stream=stream,
            precision=recipe.calibration.precision,
        )
        times.update({f"prune_{k}": v for k, v in phase.items()})
    times["prune_s"] = time.perf_counter() - t_all

    if stream is None:
        layers, summary = layer_sparsity(flat), size_summary(model, flat)
    else:
        rows = stream.state["rows"]
        layers, summary = {n: rows[n] for n, _ in flat}, stream.size_summary()
    report = Report(recipe=recipe.model_dump(), layers=layers, summary=summary, times=times)
    report.summary["block_sparsity"] = [
        sum(layers[n]["zeros"] for n, _ in block) / max(1, sum(layers[n]["params"] for n, _ in block))
        for block in per_block
    ]
    dense = untargeted_weights(model, adapter)
    if dense:  # say it: these weights are not pruned by any method (e.g. MoE experts stored as 3-D tensors)
        report.summary["kept_dense"] = dense
    return model, report


def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> dict[str, float]:
    """Perplexity over token windows ``[n, seqlen]`` plus the model's overall sparsity over its block layers."""
    adapter = adapter_for(model)
    flat = [t for block in target_layers(model, adapter) for t in block]
    s = size_summary(model, flat)
    return {
        "perplexity": perplexity(model, windows, batch_size=batch_size, progress=progress),
        "sparsity": s["target_sparsity"],
        "params": s["params"],
        "nonzeros": s["nonzeros"],
    }


def reference(model: nn.Module, tokenizer, windows: torch.Tensor, generations: int = 3, new_tokens: int = 24) -> dict:
    """What the dense model does on ``windows``: perplexity, top-1 predictions, a few greedy generations."""
    ppl, preds = score_windows(model, windows)
    prompts = prompts_from(windows, generations) if generations else []
    return {"perplexity": ppl, "predictions": preds, "prompts": prompts,
            "texts": greedy(model, tokenizer, prompts, new_tokens) if prompts else [], "new_tokens": new_tokens}


def compare(model: nn.Module, tokenizer, windows: torch.Tensor, ref: dict) -> tuple[dict, list[dict]]:
    """Perplexity of ``model``, its top-1 agreement with the reference, and the generations side by side."""
    ppl, preds = score_windows(model, windows)
    metrics = {"perplexity_dense": ref["perplexity"], "perplexity": ppl, "agreement": agreement(ref["predictions"], preds)}
    texts = greedy(model, tokenizer, ref["prompts"], ref["new_tokens"]) if ref["prompts"] else []
    gens = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False), "dense": d, "pruned": t}
        for p, d, t in zip(ref["prompts"], ref["texts"], texts)
    ]
    return metrics, gens


def _structure_words(st) -> str:
    words = []
    if st.kinds:
        words.append(f"{','.join(st.kinds)} sparsity {st.sparsity:g}, {st.criterion}" + (", global rank" if st.global_rank else "")
                     + (", bias compensation" if st.bias_compensation else ""))
    if st.remove_layers:
        words.append(f"{st.remove_layers} layer(s)")
    if st.remove_sublayers:
        words.append(f"{st.remove_sublayers} sublayer(s), {st.sublayer_method}")
    return "; ".join(words)


@dataclass
class PrunedRun:
    """What :func:`prune_run` made: the pruned ``model`` (in memory), its ``tokenizer``, the :class:`Report` whose
    dict is the saved ``prunekit.json`` (``report.metrics``: perplexity, agreement, ...), the run directory ``out``,
    and the evaluation text (``eval_text``, None when skipped)."""

    model: nn.Module
    tokenizer: object
    report: Report
    out: Path
    eval_text: str | None


def _eval_windows(tok, text: str, seqlen: int, windows: int, bos: int | None) -> torch.Tensor:
    from prunekit.batches import evaluation_windows, tokenize
    from prunekit.zoo import load_text

    return evaluation_windows(tokenize(tok, load_text(text, "evaluation")), seqlen, windows, what=f"text {text!r}", bos=bos)


def prune_run(model: str, out: str | Path, recipe: Recipe, *, eval_text: str | None = None, eval_windows: int = 16,
              generations: int = 3, ood_text: str | None = None, device: str = "cpu", overwrite: bool = False,
              trust_remote_code: bool = False, resume: bool = False, extra: dict | None = None) -> PrunedRun:
    """One ``prunekit prune`` run (in memory, not streamed): load ``model`` (zoo name, directory or hub id), measure
    the dense reference on ``eval_text``'s evaluation split (default: the calibration text's; after recovery or
    distillation the training text's; ``"none"`` skips) and on the out-of-domain text, :func:`prune` as ``recipe``
    says, compare, and write the model with its ``prunekit.json`` to ``out`` (atomically; ``extra`` fields are
    added to the record). The command ``prunekit prune`` and the benchmark grid (:mod:`prunekit.grid`) both run
    this; a mistake is a :class:`PruneError` before any work where it can be."""
    from prunekit import io
    from prunekit.batches import resolve_bos
    from prunekit.checks import check_seqlen
    from prunekit.core.progress import say
    from prunekit.zoo import load_text

    out = Path(out)
    rec = recipe
    if eval_windows <= 0:
        raise PruneError(f"--eval-windows must be positive, got {eval_windows}.")
    if generations < 0:
        raise PruneError(f"--generations must be 0 or more, got {generations}.")
    check_device(device)
    io.check_output(out, overwrite, inputs=[model])
    if rec.method == "d-pruner" and rec.options.get("general_text"):
        load_text(rec.options["general_text"], "calibration")  # an unknown general text fails before any work

    t0 = time.perf_counter()
    say(f"loading {model} ...")
    m, tok = io.load_any(model, trust_remote_code)
    check_seqlen(m, rec.calibration.seqlen)
    if rec.recovery is not None:
        check_seqlen(m, rec.recovery.seqlen, "recovery seqlen")
    times = {"load_s": time.perf_counter() - t0}
    if rec.structure is not None:
        from prunekit.structure.prune import check

        check(adapter_for(m), m, rec.structure)  # an impossible request fails here, before any work
    if rec.experts is not None:
        from prunekit.structure.experts import check as check_experts

        check_experts(adapter_for(m), m, rec.experts)

    bos_token = resolve_bos(tok, rec.calibration.bos)
    rec.calibration.bos = bos_token is not None  # recorded: what every window of this run starts with
    c = rec.calibration
    if rec.needs_data:
        load_text(c.text, "calibration")  # an unknown text fails here, before the dense reference
    train_text = None  # what recovery / distillation trains on
    if rec.recovery is not None:
        train_text = rec.recovery.text
    elif rec.distill is not None:
        train_text = rec.distill.text
    if train_text is not None:
        load_text(train_text, "calibration")
    ev_text = c.text if eval_text is None else eval_text
    if train_text is not None and eval_text is None:
        ev_text = train_text  # in domain: the held-out split of the training text
    windows = None if ev_text == "none" else _eval_windows(tok, ev_text, c.seqlen, eval_windows, bos_token)
    ood = None
    if train_text is not None:
        from prunekit.zoo.text import out_of_domain

        ood = out_of_domain(train_text) if ood_text is None else ood_text
        ood = None if ood == "none" else ood
    ood_windows = None if ood is None else _eval_windows(tok, ood, c.seqlen, eval_windows, bos_token)

    metrics, ref, ood_ref = {}, None, None
    if windows is not None:
        t0 = time.perf_counter()
        say(f"dense reference on {ev_text} ({windows.shape[0]} x {windows.shape[1]} tokens, {generations} generations) ...")
        ref = reference(m, tok, windows, generations)
        times["eval_dense_s"] = time.perf_counter() - t0
    if ood_windows is not None:
        say(f"dense reference on {ood}, out of domain ({ood_windows.shape[0]} x {ood_windows.shape[1]} tokens) ...")
        ood_ref = reference(m, tok, ood_windows, 0)

    if rec.structure is not None:
        say(f"structured pruning ({_structure_words(rec.structure)}) ...")
    elif rec.experts is not None:
        e = rec.experts
        say(f"expert pruning: {e.method}, {f'keep {e.keep}' if e.keep is not None else f'remove {e.sparsity:g}'} "
            f"per layer ({e.allocation}) ...")
    else:
        say(f"pruning with {rec.method} ({rec.pattern}, sparsity {rec.sparsity:g}, allocation {rec.allocation.kind}) ...")

    def after_prune(model, report):
        if ref is not None:
            report.metrics["perplexity_oneshot"] = compare(model, tok, windows, {**ref, "prompts": []})[0]["perplexity"]
        if ood_ref is not None:
            report.metrics["perplexity_oneshot_ood"] = compare(model, tok, ood_windows, ood_ref)[0]["perplexity"]
        r = rec.recovery
        if r is not None:
            say(f"recovery: {r.method}, {r.steps} steps of {r.batch_size} x {r.seqlen} tokens ...")
        else:
            d = rec.distill
            say(f"distillation: {d.steps} steps of {d.batch_size} x {d.seqlen} tokens ({d.precision}) ...")

    work = None
    if rec.distill is not None:
        work = out.parent / f".{out.name}.distill"
        if rec.distill.iterations > 1:
            say(f"compress, then distil in {rec.distill.iterations} parts ({rec.distill.steps} steps in all) ...")
    try:
        m, rep = prune(m, rec, tokenizer=tok, after_prune=after_prune, device=device, work_dir=work, resume=resume)
    except KeyboardInterrupt:
        if work is not None and (work / "checkpoint" / "state.json").is_file():
            say(f"the distillation checkpoint in {work} is kept: run the same command with --resume to continue")
        raise
    if ref is not None:
        t0 = time.perf_counter()
        metrics, rep.generations = compare(m, tok, windows, ref)
        times["eval_s"] = time.perf_counter() - t0
    if ood_ref is not None:
        from prunekit.zoo.text import shared_ngrams

        # what the run trained and calibrated on: the training text, and the calibration text when data was read
        seen = load_text(train_text, "calibration")
        if rec.needs_data and c.text and c.text != train_text:
            seen += "\n" + load_text(c.text, "calibration")
        ood_metrics = compare(m, tok, ood_windows, ood_ref)[0]
        metrics["ood"] = {"text": ood, **ood_metrics, "shared_13grams_with_training": shared_ngrams(seen, load_text(ood, "evaluation"))}
        if windows is not None:
            metrics["shared_13grams_with_training"] = shared_ngrams(seen, load_text(ev_text, "evaluation"))
    rep.times = {**times, **rep.times}
    rep.metrics = {**rep.metrics, **metrics}
    rep.source = str(Path(model).resolve()) if Path(model).is_dir() else model

    io.save(m, tok, out, {**rep.to_dict(), **(extra or {})}, overwrite=overwrite)
    if work is not None and work.exists():
        import shutil

        shutil.rmtree(work)  # the result is written: its checkpoint is no longer needed
    return PrunedRun(m, tok, rep, out, None if windows is None else ev_text)
