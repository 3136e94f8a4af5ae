"""One config base for every recipe and settings object: pydantic with unknown fields refused, non-finite numbers
refused, one-sentence errors, YAML/JSON files or bundled recipe names, and old spellings that keep working for
one release with a deprecation warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from prunekit.errors import PruneError

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


def one_sentence(e: ValidationError, what: str = "recipe", flags: bool = False) -> str:
    """A pydantic error as the one sentence a user reads (``flags``: name the field as its command-line flag)."""
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if flags and loc:
        where = "--" + loc.replace("_", "-")
    else:
        where = (loc if what == "recipe" else f"{what} {loc}".strip()) or what
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"Unknown {what} field {loc!r}; see docs/GLOSSARY.md or --help for the fields it takes."
    if err["type"] == "literal_error":
        return f"Invalid {where} {err.get('input')!r}: {msg}."
    return f"Invalid {where}: {msg}."


class Config(BaseModel):
    """Base of every settings object. Subclasses may set ``renamed = {"old": "new"}`` (old spellings accepted with
    a FutureWarning for one release) and ``what`` (the word used in error sentences)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    renamed: ClassVar[dict[str, str]] = {}
    what: ClassVar[str] = "recipe"
    flags: ClassVar[bool] = False  # errors name fields as command-line flags (configs that mirror a command)

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.renamed:
            data = dict(data)
            for old, new in cls.renamed.items():
                if old in data:
                    warnings.warn(f"{cls.what} field {old!r} is now {new!r}; {old!r} will be removed in the next "
                                  "release", FutureWarning, stacklevel=4)
                    if new in data and data[new] != data[old]:
                        raise ValueError(f"give {new!r} only (not also its old spelling {old!r})")
                    data[new] = data.pop(old)
        return data

    @classmethod
    def make(cls, **fields):
        """Build and validate; a mistake is one :class:`PruneError` sentence."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise PruneError(one_sentence(e, cls.what, cls.flags)) from None

    @classmethod
    def from_file(cls, path: str | Path, bundled: Path | None = None):
        """From a YAML/JSON file, or a bundled recipe name when ``bundled`` (a folder of ``<name>.yaml``) has it."""
        p = Path(path)
        if bundled is not None and not p.is_file() and (bundled / f"{path}.yaml").is_file():
            p = bundled / f"{path}.yaml"
        return cls.make(**read_mapping(p))
