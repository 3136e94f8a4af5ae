"""Seeded fuzzing of the command line: random flag combinations for `prune` and `data select` on a tiny model.

Every invocation ends in exit 0 with a valid output (strict-JSON manifest, finite weights) or in exit 2 with one
`error:` line and no output; never a traceback (an exception other than a clean exit fails the test at once).
Bounded to about a minute in all.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from tests.conftest import error_line, invoke

BUDGET_S = 30.0  # per command family; two families


def _pick(rng: random.Random, choices: dict) -> list[str]:
    """Zero to four flags, each with one of its values (good and bad ones)."""
    args = []
    for flag in rng.sample(sorted(choices), rng.choice([0, 1, 1, 2, 2, 3, 4])):
        v = rng.choice(choices[flag])
        args += [flag] if v is True else [flag, str(v)]
    return args


PRUNE_FLAGS = {
    "--method": ["magnitude", "wanda", "sparsegpt", "gblm", "bogus", ""],
    "--sparsity": ["0", "0.3", "0.5", "0.99", "1", "-0.1", "nan", "inf", "abc"],
    "--pattern": ["unstructured", "2:4", "4:8", "3:2", "0:4", "2:3", "x"],
    "--allocation": ["uniform", "global", "owl", "list", "bogus"],
    "--min-density": ["0", "0.1", "1", "2", "nan"],
    "--owl-m": ["5", "0", "-1", "nan"],
    "--owl-lambda": ["0.08", "0", "0.6", "inf"],
    "--per-layer": ["0.5,0.5", "0.5", "0.1,0.9", "a,b", "1.5,0.2"],
    "--gblm-alpha": ["0", "100", "-1", "nan"],
    "--calib-mode": ["sequential", "one-pass", "both"],
    "--calib-samples": ["1", "4", "0", "-3", "100000"],
    "--seqlen": ["1", "2", "16", "32", "0", "100000"],
    "--seed": ["0", "7", "-1"],
    "--blocksize": ["1", "16", "0"],
    "--dampening": ["0.01", "0", "1", "nan"],
    "--exclude": ["*.mlp.*", "*", "model.layers.0.*", "[", "none"],
    "--eval-windows": ["1", "0", "-2"],
    "--generations": ["0", "1", "-1"],
    "--device": ["cpu", "cpu", "foo", "cuda:7"],
    "--structure": ["heads", "mlp", "heads,mlp", "hidden", "mlp,mlp", "blocks", ""],
    "--ratio": ["0.25", "0.5", "0", "0.99", "1", "nan"],
    "--criterion": ["fluctuation", "magnitude", "taylor", "random", "bogus"],
    "--remove-layers": ["0", "1", "2", "5", "-1"],
    "--remove-sublayers": ["1", "3", "-1"],
    "--gqa": ["query", "kv", "x"],
    "--global-rank": [True],
    "--bias-compensation": [True],
    "--recover": ["perp", "lora", "full", "bogus"],
    "--recover-steps": ["1", "0"],
    "--bos": [True],
    "--no-bos": [True],
    "--eval-text": ["none", "pydoc", "nothing.txt"],
}


def _check_run_dir(out) -> None:
    from safetensors.torch import load_file

    manifest = json.loads((out / "prunekit.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert "recipe" in manifest
    for f in out.glob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            assert t.isfinite().all(), f"{name} in {f} is not finite"


@pytest.mark.parametrize("seed", [0])
def test_fuzz_prune(tiny_dir, tmp_path, seed, one_thread):
    d, text = tiny_dir
    rng = random.Random(seed)
    t0, runs, codes = time.perf_counter(), 0, {0: 0, 2: 0}
    while time.perf_counter() - t0 < BUDGET_S:
        out = tmp_path / f"o{runs}"
        args = ["prune", d, "--calib", text, "--calib-samples", "4", "--seqlen", "32", "--eval-windows", "1",
                "--generations", "0", *_pick(rng, PRUNE_FLAGS), "--out", out]
        rc, _, err = invoke(*args)
        assert rc in (0, 2), (args, rc, err)
        if rc == 0:
            _check_run_dir(out)
        else:
            error_line(err)
            assert not out.exists(), args
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], args  # no temporaries left
        codes[rc] += 1
        runs += 1
    assert runs >= 5 and codes[0] and codes[2], codes


SELECT_FLAGS = {
    "--keep": ["0.1", "0.5", "1", "0", "1.5", "-0.2", "nan", "x"],
    "--strategy": ["easiest", "hardest", "random", "ccs", "dbp", "semdedup", "bogus"],
    "--class-balanced": [True],
    "--beta": ["0", "0.1", "0.9", "1", "-0.1", "nan"],
    "--bins": ["1", "50", "0", "-1"],
    "--eps": ["0.05", "0", "2", "5", "nan"],
    "--temperature": ["0.1", "0", "-1", "inf"],
    "--neighbors": ["1", "5", "0"],
    "--seed": ["0", "3", "-1"],
}


def test_fuzz_data_select(tmp_path):
    rc, _, err = invoke("data", "score", "digits", "--score", "prototype", "--encoder", "pca", "--clusters", "8",
                        "--out", tmp_path / "s.parquet")
    assert rc == 0, err
    from prunekit.data import load_keep

    rng = random.Random(1)
    t0, runs, codes = time.perf_counter(), 0, {0: 0, 2: 0}
    while time.perf_counter() - t0 < BUDGET_S:
        out = tmp_path / f"k{runs}.parquet"
        args = ["data", "select", tmp_path / "s.parquet", *_pick(rng, SELECT_FLAGS), "--out", out]
        rc, _, err = invoke(*args)
        assert rc in (0, 2), (args, rc, err)
        if rc == 0:
            idx, meta = load_keep(out)
            assert len(idx) and len(np.unique(idx)) == len(idx) and meta["fingerprint"]
        else:
            error_line(err)
            assert not out.exists(), args
        codes[rc] += 1
        runs += 1
    assert runs >= 20 and codes[0] and codes[2], codes
