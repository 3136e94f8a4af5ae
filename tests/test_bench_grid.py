"""`prunekit bench GRID.yaml`: a grid of pruning runs on the tiny model, run in this process (and on Ray)."""

import json
from html.parser import HTMLParser

import pytest
import torch
from tests.conftest import error_line, invoke
from safetensors.torch import load_file

from prunekit.grid import Grid, expand


def write_grid(tmp_path, d, text, body: str, name: str = "grid.yaml"):
    """A grid file on the tiny model: 8 calibration windows of 32 tokens, 4 evaluation windows, 1 generation."""
    g = tmp_path / name
    g.write_text(f"model: {d}\nbase:\n  calibration: {{text: {text}, samples: 8, seqlen: 32}}\n"
                 "evaluation: {windows: 4, generations: 1}\nthreads: 1\n" + body)
    return g


def manifest(path):
    return json.loads((path / "prunekit.json").read_text())


class _Parse(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_names_and_duplicates():
    """The product, minus what N:M makes equal (sparsity and allocation do not apply to it), named by what varies."""
    g = Grid.make(model="x", axes={"method": ["wanda", "sparsegpt"], "sparsity": [0.25, 0.5],
                                   "pattern": ["unstructured", "2:4"], "allocation": ["uniform", "owl"]},
                  runs=[{"method": "magnitude", "sparsity": 0.7}, {"name": "mine", "method": "wanda",
                                                                   "recovery": {"method": "lora", "steps": 5}}])
    notes = []
    entries = expand(g, notes)
    names = [e.name for e in entries]
    assert len(entries) == 2 * 2 * 2 + 2 + 2 and len(set(names)) == len(names)
    assert names[:5] == ["wanda-s0.25-uniform", "wanda-s0.25-owl", "wanda-2of4", "wanda-s0.5-uniform",
                         "wanda-s0.5-owl"]
    assert "sparsegpt-2of4" in names and names[-2:] == ["magnitude-s0.7", "mine"]
    assert len(notes) == 6 and all("same run as grid entry" in n for n in notes)
    nm = next(e for e in entries if e.name == "wanda-2of4")
    assert nm.recipe.sparsity == 0.5 and nm.recipe.allocation.kind == "uniform"
    assert entries[-1].recipe.recovery.method == "lora" and entries[-1].recipe.recovery.steps == 5
    assert expand(g)[3].name == names[3]  # stable


def test_example_grid_is_valid():
    from pathlib import Path

    from prunekit.grid import load_grid

    g = load_grid(Path(__file__).parents[1] / "examples" / "grid-smollm2.yaml")
    assert [e.name for e in expand(g)] == ["wanda-s0.25", "wanda-s0.5", "sparsegpt-s0.25", "sparsegpt-s0.5",
                                           "sparsegpt-2of4"]


def test_grid_runs_records_and_reports(tiny_dir, tmp_path):
    d, text = tiny_dir
    g = write_grid(tmp_path, d, text, "axes:\n  method: [magnitude, wanda]\n  sparsity: [0.3, 0.6]\nspeed: true\n")
    out = tmp_path / "grid"
    rc, so, se = invoke("bench", g, "--out", out, "--quiet")
    assert rc == 0, se
    names = ["magnitude-s0.3", "magnitude-s0.6", "wanda-s0.3", "wanda-s0.6"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    for k, n in enumerate(names, 1):
        assert f"run {k}/4 {n}: perplexity" in so
    grid = json.loads((out / "grid.json").read_text())
    assert [r["name"] for r in grid["rows"]] == names and grid["ok"] == 4 and grid["failed"] == 0
    ppl = {}
    for r in grid["rows"]:
        man = manifest(out / r["name"])
        assert man["status"] == "ok" and man["grid"]["done"] and (out / r["name"] / "model.safetensors").is_file()
        assert r["perplexity"] == man["metrics"]["perplexity"] and r["agreement"] == man["metrics"]["agreement"]
        assert man["recipe"]["method"] == r["fields"]["method"] and man["recipe"]["sparsity"] == r["fields"]["sparsity"]
        assert r["achieved_sparsity"] == pytest.approx(r["fields"]["sparsity"], abs=1e-3)
        assert man["metrics"]["tokens_per_s"] > 0 and man["metrics"]["tokens_per_s_dense"] > 0
        ppl[r["name"]] = r["perplexity"]
    assert ppl["wanda-s0.3"] != ppl["wanda-s0.6"] and ppl["magnitude-s0.3"] != ppl["magnitude-s0.6"]
    md = (out / "grid.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    page = (out / "report.html").read_text()
    p = _Parse()
    p.feed(page)
    assert "table" in p.tags and "img" in p.tags and all(n in page for n in names)

    # the same code path as `prunekit prune`: the same recipe gives the same numbers
    rc, so, se = invoke("prune", d, "--method", "wanda", "--sparsity", "0.6", "--calib", text, "--calib-samples", "8",
                        "--seqlen", "32", "--eval-windows", "4", "--generations", "1", "--out", tmp_path / "single",
                        "--quiet")
    assert rc == 0, se
    single = manifest(tmp_path / "single")
    assert single["metrics"]["perplexity"] == pytest.approx(ppl["wanda-s0.6"], rel=1e-6)
    assert single["recipe"] == manifest(out / "wanda-s0.6")["recipe"]


def test_failed_run_is_recorded_and_the_others_go_on(tiny_dir, tmp_path, monkeypatch):
    """Two runs fail at run time (an N:M that does not divide the layers: a user's mistake; wanda raising: a bug);
    each is a run directory with status failed and its error; the magnitude run is ok; exit 1."""
    from prunekit.methods.wanda import Wanda

    def boom(self, *a, **k):
        raise RuntimeError("boom in wanda")

    monkeypatch.setattr(Wanda, "prune_group", boom)
    d, text = tiny_dir
    g = write_grid(tmp_path, d, text, "axes:\n  method: [magnitude, wanda]\n  sparsity: [0.5]\n"
                                      "runs:\n  - {method: magnitude, pattern: '3:5'}\n")
    out = tmp_path / "grid"
    rc, so, se = invoke("bench", g, "--out", out, "--quiet")
    assert rc == 1, se
    rows = {r["name"]: r for r in json.loads((out / "grid.json").read_text())["rows"]}
    assert set(rows) == {"magnitude", "wanda", "magnitude-3of5"}
    assert rows["magnitude"]["status"] == "ok" and rows["magnitude"]["perplexity"] > 1
    assert rows["wanda"]["status"] == "failed" and rows["wanda"]["error"] == "RuntimeError: boom in wanda"
    assert rows["magnitude-3of5"]["status"] == "failed" and "3:5" in rows["magnitude-3of5"]["error"]
    for n in ("wanda", "magnitude-3of5"):
        man = manifest(out / n)
        assert man["status"] == "failed" and man["error"] == rows[n]["error"] and man["recipe"]["method"]
        assert [p.name for p in (out / n).iterdir()] == ["prunekit.json"]
    assert "Traceback" in manifest(out / "wanda")["traceback"] and "traceback" not in manifest(out / "magnitude-3of5")
    assert "run 2/3 wanda: failed: RuntimeError: boom in wanda" in so and "1 ok, 2 failed" in so
    assert "failed: RuntimeError: boom in wanda" in (out / "report.html").read_text()
    assert "## failed runs" in (out / "grid.md").read_text()

    # resumed: the failed runs are run again (now wanda works), the complete one is skipped
    monkeypatch.undo()
    rc, so, se = invoke("bench", g, "--out", out, "--quiet")
    assert rc == 1 and "run 1/3 magnitude: done before, skipped" in so and "run 2/3 wanda: perplexity" in so
    assert manifest(out / "wanda")["status"] == "ok"


@pytest.mark.parametrize("body, phrase", [
    ("axes: {method: [magnitude, wandaa], sparsity: [0.5]}", "grid entry 2 (method=wandaa, sparsity=0.5)"),
    ("axes: {method: [magnitude], sparsity: [0.5, 1.5]}", "grid entry 2 (method=magnitude, sparsity=1.5): Invalid sparsity"),
    ("axes: {recovery: [none, {method: perp, steps: 0}]}", "grid entry 2 (recovery="),
    ("runs: [{method: magnitude}, {methd: wanda}]", "grid runs[1]: unknown recipe field 'methd'"),
    ("axis: {method: [wanda]}", "Unknown grid field 'axis'"),
    ("axes: {methd: [wanda]}", "axis 'methd' is not a recipe field"),
    ("axes: {calibration.sampels: [8]}", "'sampels' is not a field of calibration"),
    ("axes: {method: [wanda]}\nevaluation: {windows: 0}", "Invalid grid evaluation.windows"),
    ("axes: {method: [wanda]}\nbase: {methd: wanda}", "grid base: unknown recipe field 'methd'"),
    ("runs: [{method: wanda, calibration: {text: no-such-text}}]", "grid entry 1 (runs[0]: method=wanda"),
])
def test_invalid_grid_exit_2_nothing_written(tiny_dir, tmp_path, body, phrase):
    d, text = tiny_dir
    g = tmp_path / "bad.yaml"
    g.write_text(f"model: {d}\n{body}\n")
    out = tmp_path / "grid"
    rc, so, se = invoke("bench", g, "--out", out)
    assert rc == 2
    assert phrase in error_line(se)
    assert not out.exists()


def test_unknown_task_exit_2(tiny_dir, tmp_path):
    d, text = tiny_dir
    g = write_grid(tmp_path, d, text, "axes: {method: [magnitude]}\ntasks: [kick-closed, no-such-task]\n")
    rc, so, se = invoke("bench", g, "--out", tmp_path / "grid")
    assert rc == 2 and "grid tasks: Unknown task 'no-such-task'" in error_line(se)
    assert not (tmp_path / "grid").exists()


def test_resume_skips_complete_runs(tiny_dir, tmp_path):
    d, text = tiny_dir
    g = write_grid(tmp_path, d, text, "axes: {method: [magnitude], sparsity: [0.3, 0.6]}\nkeep_models: false\n"
                                      f"out: {tmp_path / 'grid'}\n")
    out = tmp_path / "grid"
    rc, so, se = invoke("bench", g, "--no-report", "--quiet")
    assert rc == 0, se
    assert not (out / "report.html").exists()
    assert not list(out.glob("*/*.safetensors")) and manifest(out / "s0.3")["grid"]["kept_model"] is False
    before = {n: (out / n / "prunekit.json").stat().st_mtime_ns for n in ("s0.3", "s0.6")}
    rc, so, se = invoke("bench", g, "--no-report", "--quiet")
    assert rc == 0 and "run 1/2 s0.3: done before, skipped (perplexity" in so and "2 ok (2 done before, skipped)" in so
    assert {n: (out / n / "prunekit.json").stat().st_mtime_ns for n in before} == before
    # an interrupted run (record written, its tasks/speed not done) is run again
    man = manifest(out / "s0.6")
    man["grid"]["done"] = False
    (out / "s0.6" / "prunekit.json").write_text(json.dumps(man))
    rc, so, se = invoke("bench", g, "--no-report", "--quiet")
    assert rc == 0 and "run 1/2 s0.3: done before" in so and "run 2/2 s0.6: perplexity" in so
    # another grid into the same directory: refused before anything runs; --overwrite redoes every run
    g.write_text(g.read_text().replace("windows: 4", "windows: 3"))
    rc, so, se = invoke("bench", g, "--no-report")
    assert rc == 2 and "holds a run of another grid entry" in error_line(se)
    rc, so, se = invoke("bench", g, "--no-report", "--overwrite", "--quiet")
    assert rc == 0 and "skipped" not in so
    assert {n: (out / n / "prunekit.json").stat().st_mtime_ns for n in before} != before
    # a directory prunekit bench did not write is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, so, se = invoke("bench", g, "--out", other)
    assert rc == 2 and "did not write" in error_line(se)


@pytest.fixture(scope="module")
def ray_started():
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Ray cannot start here: {e}")
    yield ray
    ray.shutdown()


@pytest.mark.slow  # as the data engine's Ray test: Ray starts, its workers import torch (~20 s here, more on a busy machine)
def test_ray_grid_equals_local(tiny_dir, tmp_path, ray_started):
    d, text = tiny_dir
    g = write_grid(tmp_path, d, text, "axes: {method: [wanda, sparsegpt], sparsity: [0.3, 0.6]}\n"
                                      "threads: 2\n")
    rc, so, se = invoke("bench", g, "--out", tmp_path / "local", "--no-report", "--quiet")
    assert rc == 0, se
    rc, so, se = invoke("bench", g, "--out", tmp_path / "ray", "--engine", "ray", "--no-report", "--quiet")
    assert rc == 0, se
    local = json.loads((tmp_path / "local" / "grid.json").read_text())["rows"]
    ray = json.loads((tmp_path / "ray" / "grid.json").read_text())["rows"]
    assert [r["name"] for r in ray] == [r["name"] for r in local]
    for a, b in zip(local, ray):
        assert b["status"] == "ok"
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
        assert b["agreement"] == pytest.approx(a["agreement"], abs=1e-9)
        wa = load_file(tmp_path / "local" / a["name"] / "model.safetensors")
        wb = load_file(tmp_path / "ray" / b["name"] / "model.safetensors")
        q = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(wa[q] == 0, wb[q] == 0)  # the same mask
        assert torch.allclose(wa[q], wb[q], rtol=0, atol=1e-6)  # and the same updated weights (sparsegpt)
