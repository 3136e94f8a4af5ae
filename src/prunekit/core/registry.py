"""One small registry for every pluggable concept (LLM methods, structured / vision / channel criteria, data
scores and selections, allocations, schedules, recovery methods, and the families to come).

An entry is a name, its implementation, an optional parameter model (a :class:`~prunekit.core.config.Config`
with the entry's own options and their defaults) and one line of description. The "choose one of ..." error and
the list of choices in recipes and ``--help`` come from here, so adding an entry touches one file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prunekit.errors import PruneError


@dataclass(frozen=True)
class Entry:
    name: str
    impl: Any
    params: type | None = None  # a Config subclass with the entry's own options
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    meta: dict = field(default_factory=dict)  # facts other code asks about an entry (e.g. needs_labels)


class Registry:
    def __init__(self, concept: str, loader: Callable[[], None] | None = None):
        """``concept``: what an entry is, in the error sentence ("method", "data score", ...). ``loader``: imports
        the modules that register entries, run on first use (keeps imports light)."""
        self.concept = concept
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def register(self, name: str, impl: Any = None, *, params: type | None = None, description: str = "",
                 aliases: tuple[str, ...] = (), **meta):
        """Register ``impl`` under ``name``; without ``impl`` it is a decorator."""

        def add(obj):
            if name in self._entries or name in self._aliases:
                raise ValueError(f"{self.concept} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, params, description, tuple(aliases), dict(meta))
            for a in aliases:
                self._aliases[a] = name
            return obj

        return add if impl is None else add(impl)

    def register_names(self, described: tuple[tuple[str, str], ...]) -> None:
        """Register concepts that are only names (the code dispatches on the name): ``((name, description), ...)``."""
        for name, description in described:
            self.register(name, name, description=description)

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries or name in self._aliases

    def __iter__(self):
        return iter(self.names())

    def choices(self) -> str:
        return ", ".join(self.names())

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (an alias maps to its entry), or one sentence listing the choices."""
        self._load()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise PruneError(f"Unknown {self.concept} {name!r}; choose one of: {self.choices()}.")

    def get(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def options(self, name: str, given: dict | None = None):
        """The entry's parameter model filled from ``given`` (validated, one sentence on a mistake), or None."""
        entry = self.get(name)
        if entry.params is None:
            if given:
                raise PruneError(f"The {self.concept} {entry.name!r} takes no options; drop {', '.join(sorted(given))}.")
            return None
        return entry.params.make(**(given or {}))


def registered(module: str, name: str):
    """A pydantic validator for a config field naming an entry of the registry ``module.name``: the value becomes the
    registered name (aliases resolved), an unknown one is the registry's "choose one of" sentence. The registry is
    imported when a value is checked, so a config module does not import every family."""
    from pydantic import AfterValidator

    def check(v: str) -> str:
        import importlib

        return getattr(importlib.import_module(module), name).canonical(v)

    return AfterValidator(check)
