"""What every benchmark script shares: the machine line its results quote, its JSON results file read back."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def load_json(path: Path) -> dict:
    """The results a previous run wrote (parts run again replace theirs), or nothing."""
    return json.loads(path.read_text()) if path.exists() else {}
