"""The rest of the LLM literature, each method next to its closest existing baseline on SmolLM2-135M.

Parts (each in ``benchmarks/llm_methods_parts/<name>.py``, a ``run(ctx) -> dict`` with ``rows`` and ``targets``):
d_pruner, paser, cfsp, adapt_pruner, loraprune, compresso, rd. Every part loads a fresh copy of the bundled
SmolLM2-135M (``ctx.load()``), draws its windows from the project's text splits (calibration / recovery from the
``calibration`` split, perplexity on the held-out ``evaluation`` split), and reports each target met or missed.

Writes benchmarks/results/llm_methods.{json,md,png}; a part run again replaces only its own entry.

    .venv/bin/python benchmarks/llm_methods.py                 # every part
    .venv/bin/python benchmarks/llm_methods.py --parts rd,cfsp # some
    .venv/bin/python benchmarks/llm_methods.py --quick         # smoke run: few windows / steps (not for figures)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_parts  # noqa: E402

import prunekit  # noqa: E402
from prunekit.batches import bos_id, calibration_batches, evaluation_windows, tokenize  # noqa: E402
from prunekit.evaluate import perplexity  # noqa: E402

PARTS = ("d_pruner", "paser", "cfsp", "adapt_pruner", "loraprune", "compresso", "rd")


@dataclass
class Ctx:
    """What every part shares: the model, the texts' windows, perplexity; ``quick`` shrinks every setting."""

    quick: bool = False
    seqlen: int = 256
    _tok: object = None
    _ids: dict = field(default_factory=dict)

    def load(self):
        """A fresh (model, tokenizer) of the bundled SmolLM2-135M (fp32, eval mode)."""
        model, tok = prunekit.load_model("smollm2-135m")
        self._tok = tok
        return model.eval(), tok

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from prunekit.zoo.models import smollm2_dir

            self._tok = AutoTokenizer.from_pretrained(smollm2_dir())
        return self._tok

    def ids(self, text: str, split: str) -> torch.Tensor:
        key = (text, split)
        if key not in self._ids:
            self._ids[key] = tokenize(self.tok, prunekit.load_text(text, split))
        return self._ids[key]

    def calib(self, text: str = "shakespeare", samples: int = 32, seed: int = 0) -> torch.Tensor:
        """``samples`` windows of the text's calibration split (never its evaluation split)."""
        n = min(samples, 8) if self.quick else samples
        return calibration_batches(self.ids(text, "calibration"), n, self.seqlen, seed=seed, bos=bos_id(self.tok))

    def test(self, text: str = "shakespeare", windows: int = 32) -> torch.Tensor:
        """Held-out windows of the text's evaluation split."""
        n = min(windows, 4) if self.quick else windows
        return evaluation_windows(self.ids(text, "evaluation"), self.seqlen, n, bos=bos_id(self.tok))

    def ppl(self, model, text: str = "shakespeare", windows: int = 32) -> float:
        return round(float(perplexity(model, self.test(text, windows))), 3)

    def steps(self, n: int) -> int:
        """Training steps: ``n``, or a handful in a quick run."""
        return min(n, 4) if self.quick else n


def main() -> None:
    run_parts("llm_methods", "The rest of the LLM literature on SmolLM2-135M", PARTS, lambda args: Ctx(quick=args.quick),
              "ppl", __doc__)


if __name__ == "__main__":
    main()
