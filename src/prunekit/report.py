"""The report of a run: recipe, per-layer sparsity, size, timings, metrics; JSON out, a short table for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    recipe: dict
    layers: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # numbers, and per-text dicts (ood)
    source: str | None = None
    generations: list[dict] = field(default_factory=list)  # {"prompt", "dense", "pruned"}

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        r, s = self.recipe, self.summary
        out = [
            f"method {r.get('method')}  pattern {r.get('pattern')}  requested sparsity {r.get('sparsity'):.3f}",
            f"target layers {len(self.layers)}  achieved sparsity {s.get('target_sparsity', 0):.4f}  "
            f"model params {s.get('params', 0):,}  non-zeros {s.get('nonzeros', 0):,}",
        ]
        if s.get("kept_dense"):
            d = s["kept_dense"]
            out.append(
                f"kept dense (not linear layers, no method prunes them): {sum(d.values()):,} weights in "
                + ", ".join(d)
            )
        return out + self.tail_lines()

    def tail_lines(self) -> list[str]:
        """Timings, metrics and generations: the end of every report, unstructured or structured."""
        out = []
        if self.times:
            out.append("time  " + "  ".join(f"{k} {v:.1f}s" for k, v in self.times.items()))
        if self.metrics:
            out.append("metrics  " + "  ".join(f"{k} {v:.3f}" for k, v in self.metrics.items() if isinstance(v, (int, float))))
        for g in self.generations:
            out.append(f"prompt  {g['prompt']!r}")
            out.append(f"  dense   {g['dense']!r}")
            out.append(f"  pruned  {g['pruned']!r}")
        return out
