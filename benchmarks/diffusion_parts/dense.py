"""The dense reference: the figures every method is compared with."""

from __future__ import annotations


def run(ctx) -> dict:
    row = ctx.measure("dense")
    ctx._memo["dense_row"] = row
    return {"setup": "The reference pipeline as trained, no pruning.", "rows": [row],
            "top_level": {"dense_class_fidelity": row["class_fidelity"], "dense_fid": row["fid"]}}
