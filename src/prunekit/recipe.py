"""Recipe: everything that defines one pruning run, validated, with YAML/JSON in and out.

A recipe is saved beside every result (``prunekit.json``) so that a run can be repeated exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit.errors import PruneError

METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")


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


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    text: str = "shakespeare"
    samples: int = Field(32, description="number of calibration sequences")
    seqlen: int = Field(256, description="tokens per calibration sequence")
    seed: int = 0
    batch_size: int = Field(8, description="sequences per forward pass")
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
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v


class Allocation(BaseModel):
    """How the sparsity is spread over layers (see prunekit.core.allocate)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["uniform", "global", "owl", "lamp", "erk", "list"] = "uniform"
    min_density: float = Field(0.0, description="global / lamp: the least fraction of weights any layer keeps")
    owl_m: float = Field(5.0, description="OWL: a score is an outlier above M x its block's mean score")
    owl_lambda: float = Field(0.08, description="OWL: block sparsities span [s - lambda, s + lambda]")
    per_layer: list[float] | None = Field(None, description="list: one sparsity per decoder layer")

    @field_validator("min_density")
    @classmethod
    def _density(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _list_given(self) -> Allocation:
        if self.kind == "list" and not self.per_layer:
            raise ValueError("kind 'list' needs per_layer: one sparsity per decoder layer")
        if self.kind != "list" and self.per_layer:
            raise ValueError("per_layer is only used with kind 'list'")
        return self


class Recovery(BaseModel):
    """Training after pruning that keeps every pruned weight at exactly zero.

    perp: train norm weights, biases and LoRA adapters (merged into the weights, mask re-applied);
    lora: LoRA adapters only; full: every weight, masks enforced after each step;
    distill: like perp, with loss = (1 - distill_weight) * LM loss + distill_weight * KL(dense || pruned).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    method: Literal["perp", "lora", "full", "distill"] = "perp"
    steps: int = 100
    lr: float = 2e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    text: str = "shakespeare"
    samples: int = 128
    seqlen: int = 256
    batch_size: int = 4
    distill_weight: float = 0.5
    temperature: float = 1.0
    seed: int = 0

    @field_validator("steps", "lora_rank", "samples", "seqlen", "batch_size")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer, got {v}")
        return v

    @field_validator("lr", "temperature", "lora_alpha")
    @classmethod
    def _positive_float(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"must be positive, got {v}")
        return v

    @field_validator("distill_weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v}")
        return v


class Structure(BaseModel):
    """Structured pruning: remove whole heads / MLP channels / layers so the model gets smaller and faster.

    kinds + ratio: width (fraction of removable units of each kind, see prunekit.structure.plan);
    remove_layers: whole blocks by block influence; remove_sublayers: attention / MLP sublayers.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kinds: list[Literal["heads", "mlp", "hidden"]] = Field(
        default_factory=list, description="what to prune in width: heads, mlp, hidden (the residual stream, Minitron)"
    )
    ratio: float = Field(
        0.0, description="fraction of each attention / MLP sublayer's weights removed (of the hidden channels for hidden), [0, 1)"
    )
    criterion: Literal["magnitude", "magnitude-l1", "fluctuation", "taylor", "random"] = "fluctuation"
    global_rank: bool = Field(False, description="rank standardized scores over all layers (FLAP) instead of per layer")
    bias_compensation: bool = Field(False, description="add the removed channels' mean output to the biases (FLAP)")
    gqa: Literal["query", "kv"] = Field(
        "query", description="with GQA: remove one query head in every kv group (query) or whole kv groups (kv)"
    )
    remove_layers: int = Field(0, description="whole decoder blocks removed, lowest block influence first")
    remove_sublayers: int = Field(0, description="attention / MLP sublayers removed")
    sublayer_method: Literal["influence", "greedy"] = Field(
        "influence", description="influence: one pass, 1 - cos over each sublayer; greedy: FinerCut, least output change"
    )
    seed: int = Field(0, description="seed of the random criterion")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {v}")
        return v

    @field_validator("remove_layers", "remove_sublayers")
    @classmethod
    def _count(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be 0 or more, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Structure:
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError("kinds lists a kind twice")
        if self.kinds and self.ratio == 0:
            raise ValueError(f"pruning {','.join(self.kinds)} needs a ratio in (0, 1)")
        if self.ratio > 0 and not self.kinds:
            raise ValueError("ratio needs kinds to prune: heads, mlp, hidden")
        if self.global_rank and not self.width_kinds:
            raise ValueError("global_rank ranks heads or MLP channels; hidden-size pruning is one choice for all layers")
        if self.bias_compensation and not self.width_kinds:
            raise ValueError("bias_compensation needs heads or mlp pruning")
        if not self.kinds and not self.remove_layers and not self.remove_sublayers:
            raise ValueError("nothing to remove: give kinds and a ratio, remove_layers or remove_sublayers")
        if self.remove_layers and self.remove_sublayers:
            raise ValueError("choose remove_layers or remove_sublayers, not both")
        return self

    @property
    def width_kinds(self) -> list[str]:
        """The kinds scored per sublayer (heads, mlp); hidden is handled on its own."""
        return [k for k in self.kinds if k != "hidden"]

    @property
    def needs_data(self) -> bool:
        return bool(
            (self.kinds and (self.criterion in ("fluctuation", "taylor") or self.bias_compensation))
            or self.remove_layers
            or self.remove_sublayers
        )


class Recipe(BaseModel):
    """One pruning run. ``sparsity`` is the fraction of weights set to zero in each target layer."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["magnitude", "wanda", "sparsegpt", "gblm"] = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: Allocation = Field(default_factory=Allocation)
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of module names left dense")
    calibration: Calibration = Field(default_factory=Calibration)
    blocksize: int = Field(128, description="SparseGPT: columns per lazy-update block")
    dampening: float = Field(0.01, description="SparseGPT: fraction of the mean Hessian diagonal added to it")
    gblm_alpha: float = Field(100.0, description="GBLM: weight of the gradient term (0 gives Wanda)")
    recovery: Recovery | None = Field(None, description="optional training after pruning (masks kept)")
    structure: Structure | None = Field(None, description="structured pruning (heads, MLP channels, layers) instead of sparsity")

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern_ok(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @field_validator("blocksize")
    @classmethod
    def _blocksize(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v

    @field_validator("dampening")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be in (0, 1)")
        return v

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
        if self.gblm_alpha < 0:
            raise ValueError("gblm_alpha must be >= 0")
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
        if self.structure is not None:
            return self.structure.needs_data
        return self.method in ("wanda", "sparsegpt", "gblm")

    # ---- construction that turns validation errors into one-sentence PruneErrors ----
    @classmethod
    def make(cls, **fields) -> Recipe:
        try:
            return cls(**fields)
        except ValidationError as e:
            raise PruneError(_one_sentence(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        return cls.make(**read_mapping(path))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(), sort_keys=False)


MAX_RECIPE_BYTES = 1 << 20


def read_mapping(path: str | Path, what: str = "Recipe file") -> dict:
    """The mapping a YAML (.yaml/.yml) or JSON (.json) recipe file holds, or one sentence saying what is wrong.

    Only plain data is read (``yaml.safe_load``: no tags that build objects, no code).
    """
    p = Path(path)
    if not p.is_file():
        raise PruneError(f"{what} {p} does not exist; pass a YAML or JSON recipe file.")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise PruneError(f"{what} {p} must end in .yaml, .yml or .json, not {p.suffix or 'nothing'}.")
    if p.stat().st_size > MAX_RECIPE_BYTES:
        raise PruneError(f"{what} {p} is larger than 1 MiB; a recipe is a few lines of settings.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PruneError(f"{what} {p} is not UTF-8 text; a recipe is a YAML or JSON text file.") from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except RecursionError:
        raise PruneError(f"{what} {p} is nested too deeply to be a recipe.") from None
    except json.JSONDecodeError as e:
        raise PruneError(f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except Exception as e:  # yaml.YAMLError and its subclasses (scanner, parser, constructor errors)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise PruneError(f"{what} {p} is not valid YAML ({' '.join(str(problem).split())}{where}).") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PruneError(f"{what} {p} must hold a mapping of fields (method, sparsity, pattern, ...), not a {type(data).__name__}.")
    return data


def _one_sentence(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error" and where == "method":
        return f"Unknown method {err['input']!r}; choose one of: {', '.join(METHODS)}."
    if err["type"] == "extra_forbidden":
        return f"Unknown recipe field {where!r}; see `prunekit prune --help` for the fields a recipe takes."
    return f"Invalid {where}: {msg}."
