"""Recipe: everything that defines one pruning run, validated, with YAML/JSON in and out.

A recipe is saved beside every result (``prunekit.json``) so that a run can be repeated exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunekit.errors import PruneError

METHODS = ("magnitude", "wanda", "sparsegpt")


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
    model_config = ConfigDict(extra="forbid")
    text: str = "shakespeare"
    samples: int = Field(32, description="number of calibration sequences")
    seqlen: int = Field(256, description="tokens per calibration sequence")
    seed: int = 0
    batch_size: int = Field(8, description="sequences per forward pass")

    @field_validator("samples", "seqlen", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be a positive integer")
        return v


class Recipe(BaseModel):
    """One pruning run. ``sparsity`` is the fraction of weights set to zero in each target layer."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: Literal["layer", "global"] = Field(
        "layer", description="magnitude only: one threshold per layer, or one threshold over all target layers"
    )
    exclude: list[str] = Field(default_factory=list, description="fnmatch patterns of module names left dense")
    calibration: Calibration = Field(default_factory=Calibration)
    blocksize: int = Field(128, description="SparseGPT: columns per lazy-update block")
    dampening: float = Field(0.01, description="SparseGPT: fraction of the mean Hessian diagonal added to it")

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
        if self.scope == "global" and self.method != "magnitude":
            raise ValueError("scope 'global' is only defined for method 'magnitude'")
        if self.scope == "global" and nm is not None:
            raise ValueError("scope 'global' needs pattern 'unstructured' (N:M is per group by definition)")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_data(self) -> bool:
        return self.method in ("wanda", "sparsegpt")

    # ---- construction that turns validation errors into one-sentence PruneErrors ----
    @classmethod
    def make(cls, **fields) -> Recipe:
        try:
            return cls(**fields)
        except ValidationError as e:
            raise PruneError(_one_sentence(e)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise PruneError(f"Recipe file {p} does not exist; pass a YAML or JSON recipe file.")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise PruneError(f"Recipe file {p} must hold a mapping of fields (method, sparsity, pattern, ...).")
        return cls.make(**data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _one_sentence(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error" and where == "method":
        return f"Unknown method {err['input']!r}; choose one of: {', '.join(METHODS)}."
    if err["type"] == "extra_forbidden":
        return f"Unknown recipe field {where!r}; see `prunekit prune --help` for the fields a recipe takes."
    return f"Invalid {where}: {msg}."
