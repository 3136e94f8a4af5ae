"""`prunekit report`: the HTML page compares runs side by side, self-contained, and renders in a real browser."""

from __future__ import annotations

import base64
import json
import re
import time
from html.parser import HTMLParser

import pytest
import yaml

from prunekit import io
from prunekit.evaluate.browser import check_page, find_chromium
from prunekit.evaluate.html_report import build_report
from tests.conftest import byte_tokenizer, error_line, invoke, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
TASKS_A = {"kick-closed": {"metric": "acc", "value": 0.41, "stderr": 0.05, "n": 100,
                           "scores": {"acc": 0.41, "acc_norm": 0.43}},
           "factoid": {"metric": "exact_match", "value": 0.125, "stderr": 0.0331, "n": 96,
                       "scores": {"exact_match": 0.125}}}
TASKS_B = {"kick-closed": {"metric": "acc", "value": 0.3333, "stderr": 0.047, "n": 100, "scores": {"acc": 0.3333}}}


# ------------------------------------------------------------------------------------------- a tiny HTML tree

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag, **attrs):
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and all(c.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                    yield c
                yield from c.all(tag, **attrs)


class Tree(HTMLParser):
    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def runs_table(tree: Tree) -> tuple[list[str], dict[str, dict[str, str]], dict[str, Node]]:
    """(headers, {run: {header: cell text}}, {run: <tr>}) of the comparison table."""
    (table,) = tree.root.all("table", id="runs-table")
    headers = [th.text().strip() for th in next(table.all("thead")).all("th")]
    rows, trs = {}, {}
    for tr in next(table.all("tbody")).all("tr"):
        cells = [c for c in tr.children if isinstance(c, Node) and c.tag in ("td", "th")]
        texts, col = {}, 0
        for c in cells:
            texts[headers[col]] = c.text().strip()
            col += int(c.attrs.get("colspan", 1))
        assert col == len(headers), "every row fills the table"
        rows[texts["run"]] = texts
        trs[texts["run"]] = tr
    return headers, rows, trs


def images(tree: Tree) -> list[bytes]:
    out = []
    for tag, attrs in tree.tags:
        if tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), src[:60]
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert png.startswith(PNG)
            out.append(png)
    return out


def assert_self_contained(page: str, tree: Tree) -> None:
    for tag, attrs in tree.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for k in ("src", "href", "srcset", "action", "data"):
            v = (attrs.get(k) or "").strip().lower()
            assert not re.match(r"(https?:)?//", v), (tag, k, v[:80])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(https?:)?//", page)


# --------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two real pruned runs of a tiny Llama (with fake task scores and speeds added), a sensitivity table, a run
    written by hand and a failed run."""
    tmp = tmp_path_factory.mktemp("report")
    model = tmp / "tiny-llama"
    tiny_model("llama").save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    import pydoc_data.topics as t

    text = tmp / "text.txt"
    text.write_text("\n".join(list(t.topics.values())[:40]))
    common = ["--calib", text, "--calib-samples", 8, "--seqlen", 64, "--eval-windows", 4, "--quiet"]
    runs = {"wanda50": ["--method", "wanda", "--sparsity", "0.5"],
            "sgpt24": ["--method", "sparsegpt", "--pattern", "2:4"]}
    for name, args in runs.items():
        rc, _, err = invoke("prune", model, *args, *common, "--out", tmp / name)
        assert rc == 0, err
    plain = {}
    for name, tasks, tps in (("wanda50", TASKS_A, 1234.5), ("sgpt24", TASKS_B, 2345.25)):
        man = json.loads((tmp / name / io.MANIFEST).read_text())
        plain[name] = man
        with_tasks = json.loads(json.dumps(man))
        with_tasks["metrics"].update(tasks=tasks, tokens_per_s=tps, tokens_per_s_dense=1000.0)
        d = tmp / f"{name}-tasks"
        d.mkdir()
        io.write_json(d / io.MANIFEST, with_tasks)
    rc, _, err = invoke("sensitivity", model, "--grid", "0.3,0.6", "--calib", text, "--calib-samples", 4,
                        "--seqlen", 32, "--eval-windows", 2, "--quiet", "--out", tmp / "sens")
    assert rc == 0, err
    odd = tmp / 'hand<i>&"made"'  # a name to escape
    odd.mkdir()
    io.write_json(odd / io.MANIFEST, io.record(
        "llm", {"method": "magnitude", "sparsity": 0.7, "pattern": "unstructured", "allocation": {"kind": "global"}},
        metrics={"perplexity_dense": 10.0, "perplexity": 31.25, "agreement": 0.5, "tasks": TASKS_B},
        timings={"load_s": 1.0, "prune_s": 2.5}, layers=[{"name": "model.layers.0.mlp.up_proj", "sparsity": 0.7}],
        summary={"params": 1000, "nonzeros": 300, "target_sparsity": 0.7}, source="<model>",
        generations=[{"prompt": "<b>bold</b> & co", "dense": "x\x00y", "pruned": "z"}]))
    failed = tmp / "sgpt70-failed"
    failed.mkdir()
    io.write_json(failed / io.MANIFEST, io.record(
        "llm", {"method": "sparsegpt", "sparsity": 0.7, "pattern": "unstructured"},
        status="failed", error="CUDA out of memory <in block 3> & gave up"))
    return tmp, plain


def _report(paths, out, **kw) -> tuple[str, Tree]:
    build_report(paths, out, **kw)
    page = out.read_text(encoding="utf-8")
    return page, Tree(page)


def test_two_runs_side_by_side(made):
    tmp, plain = made
    out = tmp / "two.html"
    rc, stdout, err = invoke("report", tmp / "wanda50-tasks", tmp / "sgpt24-tasks", "--out", out, "--quiet")
    assert rc == 0, err
    assert "saved" in stdout
    page = out.read_text(encoding="utf-8")
    tree = Tree(page)
    assert_self_contained(page, tree)
    headers, rows, _ = runs_table(tree)
    for h in ("method", "pattern", "sparsity requested", "sparsity achieved", "perplexity dense", "perplexity pruned",
              "top-1 agreement", "kick-closed (acc)", "factoid (exact_match)", "parameters", "non-zeros",
              "tokens/s dense", "tokens/s pruned", "time to prune", "load + eval"):
        assert h in headers, (h, headers)
    assert set(rows) == {"wanda50-tasks", "sgpt24-tasks"}
    for name, tasks, pattern, tps in (("wanda50", TASKS_A, "unstructured", "1,234.5"),
                                      ("sgpt24", TASKS_B, "2:4", "2,345.2")):
        man, row = plain[name], rows[f"{name}-tasks"]
        m = man["metrics"]
        assert row["method"] == man["recipe"]["method"] and row["pattern"] == pattern
        assert row["sparsity requested"] == "0.5"
        assert row["sparsity achieved"] == f"{man['summary']['target_sparsity']:.4f}"
        assert row["perplexity pruned"] == f"{m['perplexity']:.2f}"
        assert row["perplexity dense"] == f"{m['perplexity_dense']:.2f}"
        assert float(row["perplexity pruned"]) == pytest.approx(m["perplexity"], abs=0.005)
        assert row["top-1 agreement"] == f"{m['agreement']:.3f}"
        assert row["parameters"] == f"{man['summary']['params']:,}"
        assert row["non-zeros"] == f"{man['summary']['nonzeros']:,}"
        assert row["tokens/s pruned"] == tps and row["tokens/s dense"] == "1,000.0"
        assert row["time to prune"] == f"{man['timings']['prune_s']:.2f} s"
        for task, v in tasks.items():
            assert row[f"{task} ({v['metric']})"] == f"{v['value']:.3f} ± {v['stderr']:.3f}"
    assert rows["sgpt24-tasks"]["factoid (exact_match)"] == ""  # that run has no such task

    pngs = images(tree)
    ids = [f.attrs["id"] for f in tree.root.all("figure")]
    assert ids == ["plot-quality", "plot-tasks", "plot-layers", "plot-speed"]
    assert len(pngs) == 4

    # generations, the recipe as YAML and the command that re-runs it, the versions
    body = tree.root.text()
    for g in plain["wanda50"]["generations"]:
        assert g["prompt"] in body
    recipes = [yaml.safe_load(p.text()) for p in tree.root.all("pre", class_="recipe")]
    assert recipes == [plain["wanda50"]["recipe"], plain["sgpt24"]["recipe"]]
    commands = [p.text() for p in tree.root.all("pre", class_="command")]
    assert commands[0].startswith(f"prunekit prune {plain['wanda50']['source']} --recipe recipe.yaml --out ")
    assert f"torch {plain['wanda50']['versions']['torch']}" in body

    # without task scores and speeds those plots and columns are not there
    page, tree = _report([tmp / "wanda50", tmp / "sgpt24"], tmp / "plain.html")
    assert [f.attrs["id"] for f in tree.root.all("figure")] == ["plot-quality", "plot-layers"]
    assert len(images(tree)) == 2
    headers, rows, _ = runs_table(tree)
    assert not any("kick" in h or "tokens/s" in h for h in headers)
    assert rows["sgpt24"]["perplexity pruned"] == f"{plain['sgpt24']['metrics']['perplexity']:.2f}"


def test_sensitivity_failed_and_escaped(made):
    tmp, plain = made
    odd = 'hand<i>&"made"'
    page, tree = _report([tmp / "wanda50", tmp / "sens", tmp / odd, tmp / "sgpt70-failed"], tmp / "mixed.html",
                         title="<script>alert(1)</script>")
    assert_self_contained(page, tree)
    assert not any(tag in ("i", "b", "script") for tag, _ in tree.tags)  # names, generations, title all escaped
    assert next(tree.root.all("title")).text() == "<script>alert(1)</script>"
    ids = [f.attrs["id"] for f in tree.root.all("figure")]
    assert ids == ["plot-quality", "plot-tasks", "plot-layers", "plot-sensitivity-1"]
    assert len(images(tree)) == 4
    sens = json.loads((tmp / "sens" / "sensitivity.json").read_text())
    assert f"with one {sens['unit']} pruned" in next(tree.root.all("figure", id="plot-sensitivity-1")).text()

    headers, rows, trs = runs_table(tree)
    assert set(rows) == {"wanda50", odd, "sgpt70-failed"}  # the sensitivity table is no row
    failed = rows["sgpt70-failed"]
    assert trs["sgpt70-failed"].attrs["class"] == "failed"
    assert failed["method"] == "sparsegpt" and failed["sparsity requested"] == "0.7"
    assert failed["sparsity achieved"] == "failed: CUDA out of memory <in block 3> & gave up"
    assert "CUDA out of memory &lt;in block 3&gt; &amp; gave up" in page
    assert rows[odd]["perplexity pruned"] == "31.25" and rows[odd]["kick-closed (acc)"] == "0.333 ± 0.047"
    assert rows[odd]["allocation"] == "global"
    body = tree.root.text()
    assert "<b>bold</b> & co" in body and "x\u2400y" in body  # control characters shown, not dropped
    assert "prunekit prune '<model>' --recipe recipe.yaml" in body
    assert f"prunekit sensitivity {sens['model']} --method {sens['method']} --grid 0.3,0.6" in body


@pytest.mark.parametrize("case", ["missing", "file", "empty-dir", "bad-json", "not-object"])
def test_bad_run_exit_2_one_sentence(made, tmp_path, case):
    tmp, _ = made
    run = tmp_path / "run"
    if case == "file":
        run.write_text("x")
    elif case != "missing":
        run.mkdir()
        if case == "bad-json":
            (run / io.MANIFEST).write_text('{"kind": "llm", ')
        elif case == "not-object":
            (run / io.MANIFEST).write_text("[1, 2]")
    out = tmp_path / "r.html"
    rc, _, err = invoke("report", tmp / "wanda50", run, "--out", out)
    assert rc == 2
    line = error_line(err)
    assert str(run) in line
    assert not out.exists() and not list(tmp_path.glob(".r.html*"))


def test_usage_and_output_errors(made, tmp_path):
    tmp, _ = made
    rc, _, err = invoke("report", "--out", tmp_path / "r.html")
    assert rc == 2 and "Missing argument" in error_line(err)
    rc, _, err = invoke("report", tmp / "wanda50", "--out", tmp_path / "r.txt")
    assert rc == 2 and ".html" in error_line(err)
    other = tmp_path / "mine.html"
    other.write_text("<p>not a report</p>")
    rc, _, err = invoke("report", tmp / "wanda50", "--out", other, "--overwrite")
    assert rc == 2 and "not a file prunekit wrote" in error_line(err)
    assert other.read_text() == "<p>not a report</p>"
    ours = tmp_path / "ours.html"
    assert invoke("report", tmp / "wanda50", "--out", ours)[0] == 0
    assert invoke("report", tmp / "wanda50", "--out", ours)[0] == 2  # exists: --overwrite needed
    assert invoke("report", tmp / "sgpt24", "--out", ours, "--overwrite")[0] == 0
    assert "sgpt24" in ours.read_text()


def test_written_atomically(made, tmp_path, monkeypatch):
    tmp, _ = made
    out = tmp_path / "r.html"
    build_report([tmp / "wanda50"], out)
    before = out.read_bytes()

    import pathlib

    monkeypatch.setattr(pathlib.Path, "write_bytes", _half)  # half the page, then the disk fails
    with pytest.raises(OSError):
        build_report([tmp / "sgpt24"], out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def _half(path, data):
    """A write that stops half way."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError("disk full")


@pytest.mark.skipif(find_chromium() is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                                    "(make setup installs chromium as root)")
def test_renders_in_headless_chromium(made):
    tmp, _ = made
    out = tmp / "browser.html"
    _, tree = _report([tmp / "wanda50-tasks", tmp / "sgpt24-tasks"], out)
    n = len(images(tree))
    t0 = time.perf_counter()
    res = check_page(out, timeout=60)
    took = time.perf_counter() - t0
    assert res["console_errors"] == [], res
    assert res["images"] == n == 4 and res["images_loaded"] == n, res
    assert isinstance(res["load_ms"], (int, float)) and res["load_ms"] > 0, res
    assert res["title"] == next(tree.root.all("title")).text()
    assert res["resources"] == []
    assert took < 30
    print(f"browser check of a 2-run report: load {res['load_ms']:.0f} ms in the page, {took:.2f} s in all")

    # the check sees what is wrong: a broken image, an external one (blocked), a script error
    bad = tmp / "bad.html"
    page = out.read_text(encoding="utf-8")
    bad.write_text(page.replace("</body>", '<img src="data:image/png;base64,AAAA"><img src="https://example.com/x.png">'
                                           "</body>"), encoding="utf-8")
    res = check_page(bad, timeout=60)
    assert res["images"] == n + 2 and res["images_loaded"] == n
    assert any("example.com" in e for e in res["console_errors"]), res
