"""Progress bars and status lines for every family, with one switch: ``--quiet`` on any command (or
:func:`set_quiet`) turns off every bar and every status line; results and errors are still printed."""

from __future__ import annotations

import sys

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
        leave: bool = False):
    """A tqdm bar on stderr; shown only when ``enabled`` and not quiet."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled or _QUIET, leave=leave,
                dynamic_ncols=True)


def say(msg: str) -> None:
    """A status line on stderr (what a command is doing now), unless quiet."""
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)
