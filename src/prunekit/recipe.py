"""Recipe: everything that defines one pruning run, validated, with YAML/JSON in and out.

A recipe is saved beside every result (``prunekit.json``) so that a run can be repeated exactly.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from prunekit.core.registry import registered
from prunekit.core.config import Config, read_mapping  # noqa: F401  (read_mapping: the one recipe-file reader)
from prunekit.errors import PruneError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"2:4"`` -> (2, 4) meaning 2 zeros in every 4 consecutive inputs."""
    if pattern == "unstructured":
        return None
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise PruneError(
            f"Pattern {pattern!r} is not understood; use 'unstructured' or N:M such as '2:4' (N zeros in every M weights)."
        ) from None
    if not 0 < n < m:
        raise PruneError(f"Pattern {pattern!r} needs 0 < N < M (N zeros in every M weights), e.g. '2:4' or '4:8'.")
    return n, m


def _fraction_removed(v: float) -> float:
    if not 0.0 <= v < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {v}")
    return v


Sparsity = Annotated[float, AfterValidator(_fraction_removed)]  # the fraction removed, in [0, 1)


def _unit(v: float) -> float:
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must be in [0, 1], got {v}")
    return v


Fraction = Annotated[float, AfterValidator(_unit)]  # a share in [0, 1] (a density, a loss weight)


def _positive_int(v: int) -> int:
    if v <= 0:
        raise ValueError(f"must be a positive integer, got {v}")
    return v


def _positive(v: float) -> float:
    if not v > 0:
        raise ValueError(f"must be positive, got {v}")
    return v


def _not_negative(v):
    if v < 0:
        raise ValueError(f"must be 0 or more, got {v}")
    return v


PositiveInt = Annotated[int, AfterValidator(_positive_int)]  # steps, sizes, counts of things that must exist
Positive = Annotated[float, AfterValidator(_positive)]  # learning rates, temperatures
Count = Annotated[int, AfterValidator(_not_negative)]  # how many of something to remove (0: none)
Weight = Annotated[float, AfterValidator(_not_negative)]  # a loss weight (0: the term is off)


class Calibration(Config):
    what = "calibration"
    text: str | None = Field("shakespeare", description="the text windows are drawn from (None: token ids were given)")
    samples: int = Field(32, description="number of calibration sequences")
    seqlen: int = Field(256, description="tokens per calibration sequence")
    seed: int = 0
    batch_size: int | Literal["all"] = Field(
        8, description="sequences per forward pass; 'all': the whole calibration set in one pass per block when "
        "memory allows (else the largest chunk that fits; the recorded recipe says what was used)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the matrix products of the calibration forwards and statistics in bfloat16 with "
        "fp32 sums (CPU: oneDNN implicit bf16; GPU: autocast); the solve and the weights stay fp32; much faster on "
        "CPUs with AMX and on GPUs, selections differ slightly")
    mode: Literal["sequential", "one-pass"] = Field(
        "sequential",
        description="sequential: each block sees the pruned outputs of the blocks before it; one-pass: statistics "
        "from the dense model only (one forward pass, faster, usually a little worse)",
    )
    bos: bool | None = Field(
        None,
        description="whether every window (calibration, recovery, evaluation, generation prompts) starts with the "
        "begin-of-sequence token; None follows the tokenizer (what tokenizer(text) does); a saved recipe records "
        "what was used",
    )

    @field_validator("samples", "seqlen", "batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if v != "all" and v <= 0:
            raise ValueError("must be a positive integer (or 'all' for batch_size)")
        return v


class Allocation(Config):
    """How the sparsity is spread over layers (see prunekit.core.allocate)."""

    what = "allocation"
    kind: Annotated[str, registered("prunekit.core.allocate", "ALLOCATIONS")] = "uniform"
    min_density: Fraction = Field(0.0, description="global / lamp: the least fraction of weights any layer keeps")
    owl_m: float = Field(5.0, description="OWL: a score is an outlier above M x its block's mean score")
    owl_lambda: float = Field(0.08, description="OWL: block sparsities span [s - lambda, s + lambda]")
    per_layer: list[float] | None = Field(None, description="list: one sparsity per decoder layer")
    table: str | None = Field(None, description="sensitivity / rd: the sensitivity.json (or its directory) that "
                              "prunekit sensitivity wrote for this model (rd: with --measure distortion; without a "
                              "table rd measures its curves itself)")
    max_deviation: Fraction | None = Field(0.2, description="sensitivity: how far a block's sparsity may stray "
                                           "from the target (None: anywhere the table reaches)")
    rd_grid: list[float] = Field([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], description="rd: the sparsities each "
                                 "unit's output distortion is measured at (the target must not pass the largest)")
    rd_unit: Literal["block", "layer"] = Field("block", description="rd: the unit of a distortion curve: a decoder "
                                               "block's target layers together, or each layer (7x the forwards)")
    rd_windows: PositiveInt = Field(4, description="rd: calibration windows the output distortion is measured on")

    @model_validator(mode="after")
    def _list_given(self) -> Allocation:
        if self.kind == "list" and not self.per_layer:
            raise ValueError("kind 'list' needs per_layer: one sparsity per decoder layer")
        if self.kind != "list" and self.per_layer:
            raise ValueError("per_layer is only used with kind 'list'")
        if self.kind == "sensitivity" and not self.table:
            raise ValueError("kind 'sensitivity' needs table: the sensitivity.json prunekit sensitivity wrote")
        if self.kind not in ("sensitivity", "rd") and self.table:
            raise ValueError("table is only used with kind 'sensitivity' or 'rd'")
        if self.kind == "rd" and (not self.rd_grid or any(not 0.0 < g < 1.0 for g in self.rd_grid)):
            raise ValueError(f"rd_grid must be sparsities in (0, 1), got {self.rd_grid}")
        return self


class Recovery(Config):
    """Training after pruning that keeps every pruned weight at exactly zero.

    perp: train norm weights, biases and LoRA adapters (merged into the weights, mask re-applied);
    lora: LoRA adapters only; full: every weight, masks enforced after each step;
    distill: like perp, with loss = (1 - distill_weight) * LM loss + distill_weight * KL(dense || pruned).
    lora_ranks importance: LoRA ranks per block from the blocks' importance (CFSP's importance-guided LoRA).
    select + keep: train (the same steps) on a share of the samples windows only: random, or paser (clusters,
    budgets by the pruned model's divergence from the dense one; see prunekit.train.select).
    """

    what = "recovery"
    method: Annotated[str, registered("prunekit.train.recovery", "RECOVERY_METHODS")] = "perp"
    steps: PositiveInt = 100
    lr: Positive = 2e-4
    lora_rank: PositiveInt = 8
    lora_alpha: Positive = 16.0
    lora_ranks: Literal["uniform", "importance"] = Field(
        "uniform", description="LoRA rank per decoder block: uniform (lora_rank everywhere) | importance (CFSP's "
        "IG-LoRA: ranks in proportion to each block's importance, the angular distance between its input and output "
        "on the training windows; the same total rank)")
    text: str = "shakespeare"
    samples: PositiveInt = 128
    seqlen: PositiveInt = 256
    batch_size: PositiveInt = 4
    distill_weight: Fraction = 0.5
    temperature: Positive = 1.0
    seed: int = 0
    select: Annotated[str, registered("prunekit.train.select", "SELECTIONS")] = Field(
        "all", description="which of the samples windows recovery trains on: all | random | paser")
    keep: float = Field(1.0, description="with select random / paser: the share of the windows selected, (0, 1]")
    clusters: PositiveInt = Field(8, description="paser: k-means clusters of the windows' MiniLM embeddings (at most samples)")
    dedup_threshold: float = Field(0.95, description="paser: a window whose cosine similarity to a selected one is above this is skipped, (0, 1]")

    @field_validator("keep", "dedup_threshold")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _keep_needs_selection(self) -> Recovery:
        if self.keep < 1.0 and self.select == "all":
            raise ValueError(f"keep {self.keep:g} needs select random or paser (select all trains on every window)")
        if self.lora_ranks == "importance" and self.method == "full":
            raise ValueError("lora_ranks importance sets the LoRA adapters' ranks, and method full trains no adapters "
                             "(use perp, lora or distill, or lora_ranks uniform)")
        return self


class Distill(Config):
    """Compress, then distil (Minitron): every weight of the pruned model is trained towards the dense teacher.

    loss = logit_weight * T^2 * KL(teacher || student) + hidden_weight * (normalized MSE of every kept block's
    output against the teacher's block it came from, on the kept hidden channels) + lm_weight * next-token loss.
    After sparsity pruning the zeros are kept (the masks are attached). With a structure section, iterations > 1
    prunes the target in that many equal parts, each scored on the model distilled so far and followed by
    steps / iterations steps (Minitron's iterative schedule); the last part reaches the exact target structure.
    schedule adapt-pruner (Pan et al. 2024) shares each part out over the blocks by their angular distance
    instead: the more a block's output resembles its input, the more of it goes (see prunekit.train.distill).
    """

    what = "distill"
    steps: PositiveInt = Field(200, description="optimizer steps in all (split evenly over the iterations)")
    iterations: PositiveInt = Field(1, description="structure only: prune the target in this many parts, distilling after each")
    schedule: Literal["even", "adapt-pruner"] = Field(
        "even", description="structure only: how each part is shared out over the blocks: even (the structure's own "
        "rule, Minitron) or adapt-pruner (by block angular distance, re-measured before every part)")
    adapt_amplitude: Fraction = Field(0.02, description="adapt-pruner: per part, how far a block's sparsity moves "
                                      "from the even step, times its normalized importance in [-1, 1]")
    lr: Positive = Field(3e-4, description="peak AdamW learning rate (linear warmup over 10% of each part, cosine to 10%)")
    batch_size: PositiveInt = Field(4, description="sequences per step")
    seqlen: PositiveInt = Field(256, description="tokens per sequence")
    samples: PositiveInt = Field(2048, description="windows drawn from text's calibration split (never an evaluation split)")
    text: str = Field("shakespeare", description="distillation text: shakespeare | pydoc | PATH.txt (its calibration split)")
    temperature: Positive = 1.0
    logit_weight: Weight = Field(1.0, description="weight of the KL term on the logits")
    hidden_weight: Weight = Field(0.0, description="weight of the hidden-state term (block outputs, normalized MSE)")
    lm_weight: Weight = Field(0.0, description="weight of the next-token loss on the text")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the forward passes in bfloat16 autocast (weights and optimizer stay fp32; much "
        "faster on CPUs with AMX and on GPUs), the teacher held in bfloat16")
    checkpoint_every: PositiveInt = Field(50, description="steps between resumable checkpoints (CLI: beside --out)")
    seed: int = 0

    @model_validator(mode="after")
    def _some_loss(self) -> Distill:
        if self.logit_weight == self.hidden_weight == self.lm_weight == 0:
            raise ValueError("every loss weight is 0; give logit_weight, hidden_weight or lm_weight a positive value")
        if self.steps < self.iterations:
            raise ValueError(f"{self.steps} steps cannot be split over {self.iterations} iterations; give at least one step each")
        return self


class Structure(Config):
    """Structured pruning: remove whole heads / MLP channels / layers so the model gets smaller and faster.

    kinds + sparsity: width (fraction of removable units of each kind, see prunekit.structure.plan);
    remove_layers: whole blocks by block influence; remove_sublayers: attention / MLP sublayers.
    """

    what = "structure"
    renamed = {"ratio": "sparsity"}
    kinds: list[Literal["heads", "mlp", "hidden"]] = Field(
        default_factory=list, description="what to prune in width: heads, mlp, hidden (the residual stream, Minitron)"
    )
    sparsity: Sparsity = Field(
        0.0, description="fraction of each attention / MLP sublayer's weights removed (of the hidden channels for hidden), [0, 1)"
    )
    criterion: Annotated[str, registered("prunekit.structure.importance", "CRITERIA")] = "fluctuation"
    global_rank: bool = Field(False, description="rank standardized scores over all layers (FLAP) instead of per layer")
    bias_compensation: bool = Field(False, description="add the removed channels' mean output to the biases (FLAP)")
    gqa: Literal["query", "kv"] = Field(
        "query", description="with GQA: remove one query head in every kv group (query) or whole kv groups (kv)"
    )
    remove_layers: Count = Field(0, description="whole decoder blocks removed, lowest block influence first")
    remove_sublayers: Count = Field(0, description="attention / MLP sublayers removed")
    sublayer_method: Literal["influence", "greedy"] = Field(
        "influence", description="influence: one pass, 1 - cos over each sublayer; greedy: FinerCut, least output change"
    )
    seed: int = Field(0, description="seed of the random criterion (and of loraprune / compresso training)")
    learn: Literal["compresso"] | None = Field(
        None, description="learn the masks instead of scoring them: compresso (hard-concrete gates over heads / MLP "
        "channels trained with LoRA under a target-size Lagrangian, then made permanent; criterion unused)")
    rounds: PositiveInt = Field(2, description="loraprune: pruning rounds to the target, LoRA training before each")
    beta: float = Field(0.9, description="loraprune: moving average of the importance over LoRA steps, "
                        "S = beta S + (1 - beta) I, in [0, 1)")
    lora_steps: PositiveInt = Field(80, description="loraprune / compresso: LoRA training steps in all (loraprune: "
                                    "rounds + 1 equal segments, the last fine-tuning the final model; compresso: half "
                                    "learning the gates, half fine-tuning after the removal)")
    lora_lr: Positive = Field(5e-4, description="loraprune / compresso: AdamW learning rate of the LoRA adapters")
    lora_rank: PositiveInt = Field(8, description="loraprune / compresso: LoRA rank")
    lora_alpha: Positive = Field(16.0, description="loraprune / compresso: LoRA alpha (scaling alpha / rank)")
    lora_batch_size: PositiveInt = Field(4, description="loraprune / compresso: calibration windows per LoRA step")
    gate_lr: Positive = Field(0.1, description="compresso: learning rate of the gates' log-alpha and of the "
                              "Lagrange multipliers (ascent)")
    collaborative_prompt: bool = Field(False, description="compresso: prepend the collaborative prompt (an "
                                       "instruction telling the model it is being pruned) to every training window")

    @model_validator(mode="after")
    def _consistent(self) -> Structure:
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError("kinds lists a kind twice")
        if self.kinds and self.sparsity == 0:
            raise ValueError(f"pruning {','.join(self.kinds)} needs a sparsity in (0, 1)")
        if self.sparsity > 0 and not self.kinds:
            raise ValueError("sparsity needs kinds to prune: heads, mlp, hidden")
        if self.global_rank and not self.width_kinds:
            raise ValueError("global_rank ranks heads or MLP channels; hidden-size pruning is one choice for all layers")
        if self.bias_compensation and not self.width_kinds:
            raise ValueError("bias_compensation needs heads or mlp pruning")
        if not self.kinds and not self.remove_layers and not self.remove_sublayers:
            raise ValueError("nothing to remove: give kinds and a sparsity, remove_layers or remove_sublayers")
        if self.remove_layers and self.remove_sublayers:
            raise ValueError("choose remove_layers or remove_sublayers, not both")
        if self.learn or self.criterion == "loraprune":
            who = f"learn {self.learn}" if self.learn else "criterion loraprune"
            if not self.width_kinds or "hidden" in self.kinds or self.remove_layers or self.remove_sublayers:
                raise ValueError(f"{who} prunes heads and MLP channels only: give kinds heads and/or mlp, without "
                                 "hidden, remove_layers or remove_sublayers")
        if self.learn and (self.criterion == "loraprune" or self.bias_compensation):
            raise ValueError(f"learn {self.learn} learns its masks; drop "
                             + ("criterion loraprune" if self.criterion == "loraprune" else "bias_compensation"))
        if self.criterion == "loraprune" and self.lora_steps < self.rounds + 1:
            raise ValueError(f"lora_steps {self.lora_steps} cannot be split over {self.rounds} rounds and the last "
                             f"fine-tuning segment; give at least {self.rounds + 1}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.collaborative_prompt and not self.learn:
            raise ValueError("collaborative_prompt goes with learn compresso")
        if self.criterion == "cfsp" and (self.global_rank or "hidden" in self.kinds):
            raise ValueError("criterion cfsp sets every block's own ratio for heads and mlp; drop "
                             + ("global_rank" if self.global_rank else "hidden from kinds"))
        if self.criterion == "cfsp" and self.sparsity > 0.9:
            raise ValueError("criterion cfsp keeps every block's ratio within [0, 0.9]; use a sparsity of at most 0.9")
        return self

    @property
    def width_kinds(self) -> list[str]:
        """The kinds scored per sublayer (heads, mlp); hidden is handled on its own."""
        return [k for k in self.kinds if k != "hidden"]

    @property
    def needs_data(self) -> bool:
        return bool(
            (self.kinds and (self.criterion in ("fluctuation", "taylor", "cfsp", "loraprune") or self.bias_compensation
                             or self.learn))
            or self.remove_layers
            or self.remove_sublayers
        )


class Experts(Config):
    """Mixture-of-experts: remove or merge whole experts in every MoE layer (see prunekit.structure.experts).

    keep: experts kept per layer (or sparsity: the fraction removed); never below the router's top-k.
    """

    what = "experts"
    method: Annotated[str, registered("prunekit.structure.experts", "EXPERT_METHODS")] = Field(
        "reap", description="frequency | reap | enumerate | merge (prunekit.structure.experts.EXPERT_METHODS)")
    keep: int | None = Field(None, description="experts kept in each MoE layer (at least the router's top-k)")
    sparsity: Sparsity = Field(0.0, description="instead of keep: the fraction of each layer's experts removed")
    allocation: Literal["uniform", "global"] = Field(
        "uniform", description="uniform: the same count per layer; global: one budget over the layers by each "
        "expert's share of its layer's score (frequency / reap / merge), at least top-k per layer")
    max_subsets: int = Field(10000, description="enumerate: above this many subsets, backward greedy elimination")
    max_tokens: int = Field(4096, description="calibration tokens per layer that enumerate, merge and router "
                            "re-calibration read again (a seeded sample); frequency and REAP use all")
    align: bool = Field(True, description="merge: permute each member's hidden neurons to its centre's first")
    recalibrate_steps: Count = Field(0, description="after pruning a layer, Adam steps fitting its router to the "
                                     "full layer's output on the calibration tokens (0: off)")
    recalibrate_lr: float = Field(1e-3, description="learning rate of the router re-calibration")

    @model_validator(mode="after")
    def _amount(self) -> Experts:
        if self.keep is not None and self.sparsity:
            raise ValueError("give keep or sparsity, not both")
        if self.keep is None and not self.sparsity:
            raise ValueError("say how many experts stay: keep (per layer) or sparsity (the fraction removed)")
        if self.keep is not None and self.keep < 1:
            raise ValueError("keep must be at least 1")
        if self.max_subsets < 1 or self.max_tokens < 1:
            raise ValueError("max_subsets and max_tokens must be positive")
        if not (self.recalibrate_lr > 0 and math.isfinite(self.recalibrate_lr)):
            raise ValueError("recalibrate_lr must be a positive number")
        return self


_METHOD_OPTIONS = {"blocksize": ("sparsegpt", "blocksize"), "dampening": ("sparsegpt", "dampening"),
                   "gblm_alpha": ("gblm", "alpha")}  # flat fields before the options moved to each method


class Recipe(Config):
    """One pruning run. ``sparsity`` is the fraction of weights set to zero in each target layer."""

    what = "recipe"

    method: Annotated[str, registered("prunekit.methods", "METHODS")] = Field("wanda", description="the pruning method (prunekit.methods.METHODS)")
    options: dict = Field(default_factory=dict, description="the method's own options (e.g. sparsegpt: blocksize, "
                          "dampening; gblm: alpha); a saved recipe lists every one with its value")
    sparsity: Sparsity = 0.5
    pattern: str = "unstructured"
    allocation: Allocation = Field(default_factory=Allocation)
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of module names left dense")
    calibration: Calibration = Field(default_factory=Calibration)
    recovery: Recovery | None = Field(None, description="optional training after pruning (masks kept)")
    structure: Structure | None = Field(None, description="structured pruning (heads, MLP channels, layers) instead of sparsity")
    experts: Experts | None = Field(None, description="mixture-of-experts: experts removed or merged per layer instead of sparsity")
    distill: Distill | None = Field(None, description="optional compress-then-distil: every weight trained towards the "
                                    "dense teacher (after structure or sparsity pruning; zeros kept)")

    @field_validator("pattern")
    @classmethod
    def _pattern_ok(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _flat_method_options(cls, data):
        """Old recipes had blocksize / dampening / gblm_alpha at the top: move them into options (the ones of
        another method than the recipe's were unused defaults and are dropped)."""
        if not isinstance(data, dict) or not any(k in data for k in _METHOD_OPTIONS):
            return data
        import warnings

        data = dict(data)
        method = data.get("method", "wanda")
        options = dict(data.get("options") or {})
        for old, (owner, new) in _METHOD_OPTIONS.items():
            if old in data:
                value = data.pop(old)
                warnings.warn(f"recipe field {old!r} is now options.{new} of method {owner}; the flat field will "
                              "be removed in the next release", FutureWarning, stacklevel=4)
                if method == owner:
                    options.setdefault(new, value)
        data["options"] = options
        return data

    @model_validator(mode="after")
    def _method_options(self) -> Recipe:
        from prunekit.methods import METHODS

        opts = METHODS.options(self.method, self.options)
        self.options = opts.model_dump() if opts is not None else {}
        return self

    @model_validator(mode="after")
    def _nm_sparsity(self) -> Recipe:
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} means sparsity {implied:g}; leave sparsity out or set it to {implied:g}"
                )
            self.sparsity = implied
        if self.allocation.kind != "uniform" and nm is not None:
            raise ValueError(
                f"allocation '{self.allocation.kind}' needs pattern 'unstructured' (N:M fixes every layer at N/M)"
            )
        if self.allocation.kind == "rd" and not self.allocation.table and self.sparsity > max(self.allocation.rd_grid) + 1e-12:
            raise ValueError(f"allocation rd measures distortion up to sparsity {max(self.allocation.rd_grid):g}, below "
                             f"the target {self.sparsity:g}; add a larger rd_grid point")
        if self.distill is not None and self.method == "d-pruner":
            raise ValueError("method d-pruner is not combined with a distill section yet; prune with d-pruner, then "
                             "distil the output, or use a recovery section")
        if self.distill is not None and self.recovery is not None:
            raise ValueError("give a distill section or a recovery section, not both (distill trains every weight "
                             "towards the dense teacher; recovery trains adapters)")
        if self.distill is not None and self.distill.iterations > 1 and self.structure is None:
            raise ValueError("distill.iterations > 1 splits a structure section into parts; sparsity pruning is done "
                             "in one part (set iterations to 1)")
        if self.distill is not None and self.distill.iterations > 1 and self.structure is not None and self.structure.learn:
            raise ValueError(f"learn {self.structure.learn} learns the whole target at once; set distill iterations to 1")
        if self.distill is not None and self.distill.schedule == "adapt-pruner":
            st = self.structure
            if st is None or not st.width_kinds or "hidden" in st.kinds or st.remove_layers or st.remove_sublayers \
                    or st.global_rank:
                raise ValueError("distill schedule adapt-pruner shares heads / mlp pruning out over the blocks; give a "
                                 "structure section with kinds heads and/or mlp only (no hidden, remove_layers, "
                                 "remove_sublayers or global_rank)")
        if self.experts is not None:
            others = [k for k in ("structure", "recovery", "distill") if getattr(self, k) is not None]
            defaults = Recipe()
            others += sorted(f for f in ("method", "sparsity", "pattern", "allocation", "exclude")
                             if f in self.model_fields_set and getattr(self, f) != getattr(defaults, f))
            if others:
                raise ValueError(
                    f"an experts section removes or merges whole experts on its own; drop {', '.join(others)} (or "
                    "prune twice: experts, then the rest on its output)"
                )
        if self.structure is not None:
            # fields of sparsity pruning given with other values than their defaults (a saved recipe repeats the
            # defaults, which is fine)
            defaults = Recipe()
            mixed = sorted(
                f for f in ("method", "sparsity", "pattern", "allocation", "exclude")
                if f in self.model_fields_set and getattr(self, f) != getattr(defaults, f)
            )
            if mixed:
                raise ValueError(
                    f"a structure section replaces sparsity pruning; drop {', '.join(mixed)} (or prune twice: "
                    "structured, then unstructured on its output)"
                )
            if self.recovery is not None:
                raise ValueError("recovery (which keeps the zeros of sparsity pruning) is not available after structured pruning yet; drop the recovery section")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_data(self) -> bool:
        if self.experts is not None:
            return True
        if self.structure is not None:
            return self.structure.needs_data
        return self.method in ("wanda", "sparsegpt", "gblm", "d-pruner") or self.allocation.kind == "rd"

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(), sort_keys=False)
