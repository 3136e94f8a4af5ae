"""Learned pruning for vision models: methods where what is removed is *trained*, not scored once (recipe field
``learn``, ``prunekit train-prune --learn NAME``).

A learner is one registry entry (``LEARNED``) whose implementation is ``run(cfg, model, data, ctx) -> (model,
masks or None)``: it trains ``model`` (in place, or returns a rebuilt one) with the shared pieces of
:mod:`prunekit.vision.train` (``train_epochs`` with its ``regularizer`` hook, ``evaluate``, ``recalibrate_bn``),
records every optimizer step in ``ctx.journey`` (pass ``journey=ctx.journey`` to ``train_epochs``), appends its
epochs to ``ctx.history`` and puts what it found in ``ctx.info`` (e.g. ``ctx.info["learn"] = {...}``).
Its own options are a :class:`~prunekit.core.config.Config` registered as the entry's ``params``; the recipe gives
them in ``options`` (CLI ``--option KEY=VALUE``) and the learner reads them with ``ctx.options``.

Each learner lives in its own module of this package; the registry's loader below imports every module of the
package (a new learner is one new file, nothing else to edit).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from prunekit.core.journey import Journey
from prunekit.core.registry import Registry


def modules() -> list[str]:
    """The learner modules of this package (each registers its entries on import), in name order."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _load() -> None:
    for name in modules():
        importlib.import_module(f"{__name__}.{name}")


LEARNED = Registry("learned method", loader=_load)


def named_modules(model, exclude) -> dict:
    """``model``'s modules by name, after checking that every name in ``exclude`` is one of them (else one
    sentence)."""
    from prunekit.errors import PruneError

    mods = dict(model.named_modules())
    bad = [n for n in exclude if n not in mods]
    if bad:
        raise PruneError(f"No module named {bad[0]!r} in the model; --exclude takes module names.")
    return mods


@dataclass
class LearnContext:
    """What ``train_prune`` hands a learner: where to record, and its validated options."""

    journey: Journey
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    options: Any = None  # the entry's params (a Config) filled from the recipe's options, or None
    progress: bool = True
