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


class hf_bars_off:
    """``with hf_bars_off():`` transformers' own progress bars (saving, loading shards) stay hidden inside, e.g.
    for a checkpoint written every few steps."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self._was:
            hf_logging.enable_progress_bar()
        return False
