"""The options every `prunekit` command shares, defined once: where the output goes (``--out``, ``--overwrite``),
the recipe file (``--recipe``), the seed (``--seed``) and ``--progress/--quiet``. Each family's sub-app uses these
(``cli.py``: prune, eval, recover, zoo; ``vision/cli.py``: train-prune; ``data/cli.py``: data score|select|train);
a user's mistake anywhere is one sentence and exit 2 (``cli.main``)."""

from __future__ import annotations

from typing import Annotated

import typer

OVERWRITE_HELP = "replace --out if it exists (only an output prunekit wrote, never an input)"
RECIPE_HELP = "YAML/JSON recipe file; flags given here override its fields"

Overwrite = Annotated[bool, typer.Option(help=OVERWRITE_HELP)]
Progress = Annotated[bool, typer.Option("--progress/--quiet", " /--no-progress",
                                        help="progress bars and status lines on stderr (--quiet: results only)")]


def out_option(help: str):
    """``--out`` / ``-o`` with this command's own description."""
    return typer.Option("--out", "-o", help=help)


def seed_option(help: str):
    return typer.Option(help=help)


def recipe_option(help: str = RECIPE_HELP):
    return typer.Option(help=help)


def start(progress: bool, hf: bool = False) -> None:
    """What every command does first: set the one progress switch (--quiet silences prunekit's bars and status
    lines; with ``hf``, also the loading/saving bars of transformers and huggingface_hub)."""
    from prunekit.core.progress import set_quiet

    set_quiet(not progress)
    if hf:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        from transformers.utils import logging

        (enable_progress_bars if progress else disable_progress_bars)()
        (logging.enable_progress_bar if progress else logging.disable_progress_bar)()
