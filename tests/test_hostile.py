"""Hostile and broken inputs: each is refused with one sentence and exit 2, nothing is written, no code runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.errors import PruneError
from tests.conftest import byte_tokenizer, error_line, invoke, tiny_model

FAST = ("--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--generations", "0")


def _prune(d, text, out, *extra):
    return invoke("prune", d, "--calib", text, *FAST, "--out", out, *extra)


def _save(model, d):
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


# 1. code from a model directory never runs
@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_model_directory_code_never_runs(tiny_dir, tmp_path, where):
    d, text = tiny_dir
    marker = tmp_path / "PWNED"
    (d / "modeling_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as Evil, LlamaConfig as EvilConfig\n"
    )
    cfg = json.loads((d / where).read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.Evil", "AutoConfig": "modeling_x.EvilConfig",
                       "AutoTokenizer": ["modeling_x.Evil", None]}
    (d / where).write_text(json.dumps(cfg))
    for cmd in (("eval", d, "--text", text), ("prune", d, "--calib", text, *FAST, "--out", tmp_path / "o")):
        rc, _, err = invoke(*cmd)
        assert rc == 2 and "--trust-remote-code" in error_line(err)
    assert not marker.exists() and not (tmp_path / "o").exists()
    # every load in the source passes trust_remote_code explicitly
    import ast

    calls = 0
    for f in Path(prunekit.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                calls += 1
                assert any(k.arg == "trust_remote_code" for k in node.keywords), f"{f}:{node.lineno}"
    assert calls >= 5


# 2. non-finite weights
@pytest.fixture
def nan_dir(tmp_path, tiny_dir):
    _, text = tiny_dir
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
        m.model.layers[0].self_attn.q_proj.weight[1, 1] = float("inf")
    return _save(m, tmp_path / "nan"), text


@pytest.mark.parametrize("extra", [
    ("--method", "magnitude"), ("--method", "wanda"), ("--method", "gblm"), ("--pattern", "2:4"),
    ("--allocation", "owl"), ("--allocation", "global"), ("--method", "sparsegpt"),
    ("--structure", "mlp", "--ratio", "0.25"),
])
def test_non_finite_weights_are_refused(nan_dir, tmp_path, extra):
    d, text = nan_dir
    rc, _, err = _prune(d, text, tmp_path / "o", *extra)
    assert rc == 2 and "model.layers.0.self_attn.q_proj.weight" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_non_finite_activations_are_refused():
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight.fill_(1e38)  # finite weights, overflowing activations
    with pytest.raises(PruneError, match="calibration activations"):
        prunekit.prune(m, {"method": "sparsegpt"}, torch.randint(0, 256, (4, 16)), progress=False)


# 3. non-finite hyper-parameters and a recovery that diverges on its last step
@pytest.mark.parametrize("flag,value", [("--sparsity", "nan"), ("--owl-m", "nan"), ("--owl-lambda", "inf"),
                                        ("--gblm-alpha", "nan"), ("--min-density", "nan"), ("--dampening", "nan"),
                                        ("--ratio", "nan")])
def test_non_finite_hyperparameters(tiny_dir, tmp_path, flag, value):
    d, text = tiny_dir
    method = {"--gblm-alpha": ("--method", "gblm"), "--dampening": ("--method", "sparsegpt"),
              "--ratio": ("--structure", "mlp")}.get(flag, ())
    rc, _, err = _prune(d, text, tmp_path / "o", *method, flag, value)
    assert rc == 2 and "finite" in error_line(err)


def test_recovery_never_saves_non_finite_weights(tiny_dir, tmp_path, monkeypatch):
    d, text = tiny_dir
    rc, _, err = _prune(d, text, tmp_path / "p")
    assert rc == 0, err
    rc, _, err = invoke("recover", tmp_path / "p", "--lr", "inf", "--steps", "1", "--text", text, "--samples", "4",
                        "--seqlen", "32", "--out", tmp_path / "r")
    assert rc == 2 and "finite" in error_line(err)
    # the last step's update makes the weights non-finite while its loss was finite
    from prunekit.train import recovery

    real = recovery._train

    def diverge(model, rec, ids, params, *a, **k):
        out = real(model, rec, ids, params, *a, **k)
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(recovery, "_train", diverge)
    rc, _, err = invoke("recover", tmp_path / "p", "--steps", "1", "--text", text, "--samples", "4", "--seqlen", "32",
                        "--out", tmp_path / "r")
    assert rc == 2 and "diverged" in error_line(err)
    assert not (tmp_path / "r").exists()


def test_manifest_is_strict_json(tmp_path):
    m = tiny_model("llama")
    prunekit.save(m, None, tmp_path / "o", {"metrics": {"perplexity": float("nan"), "x": float("inf")}})
    data = json.loads((tmp_path / "o" / "prunekit.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["metrics"] == {"perplexity": None, "x": None}
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(PruneError, match="non-finite"):
        prunekit.save(m, None, tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


# 4. --overwrite replaces only prunekit outputs, never the input, never the working directory
def test_overwrite_only_replaces_prunekit_outputs(tiny_dir, tmp_path, monkeypatch):
    d, text = tiny_dir
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    rc, _, err = _prune(d, text, theirs, "--overwrite")
    assert rc == 2 and "did not write" in error_line(err) and (theirs / "thesis.tex").is_file()
    rc, _, err = _prune(d, text, d, "--overwrite")
    assert rc == 2 and "input" in error_line(err) and (d / "model.safetensors").is_file()
    rc, _, err = _prune(d, text, d.parent, "--overwrite")  # a directory that holds the input
    assert rc == 2 and (d / "model.safetensors").is_file()
    monkeypatch.chdir(tmp_path)
    rc, _, err = _prune(d, text, ".", "--overwrite")
    assert rc == 2 and "current directory" in error_line(err)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("..")]
    out = tmp_path / "mine"
    assert _prune(d, text, out)[0] == 0
    assert _prune(d, text, out, "--overwrite")[0] == 0  # a prunekit output is replaced
    rc, _, err = invoke("recover", out, "--steps", "1", "--text", text, "--samples", "4", "--seqlen", "32",
                        "--out", out, "--overwrite")
    assert rc == 2 and "input" in error_line(err)


# 5. broken model directories
def _break(kind: str, d: Path) -> str:
    if kind == "truncated":
        f = d / "model.safetensors"
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
        return "model.safetensors"
    if kind == "config":
        (d / "config.json").write_text("{not json")
        return "config.json"
    if kind == "model_type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "llamazzz"
        (d / "config.json").write_text(json.dumps(cfg))
        return "llamazzz"
    if kind == "tokenizer":
        for f in d.glob("*token*"):
            f.unlink()
        (d / "special_tokens_map.json").unlink(missing_ok=True)
        return "no tokenizer"
    if kind == "pickle":
        state = {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}
        (d / "model.safetensors").unlink()
        torch.save(state, d / "pytorch_model.bin")
        return "pickle"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "config", "model_type", "tokenizer", "pickle"])
@pytest.mark.parametrize("cmd", ["prune", "eval", "recover"])
def test_broken_model_directory(tiny_dir, tmp_path, kind, cmd):
    d, text = tiny_dir
    phrase = _break(kind, d)
    args = {"prune": ("prune", d, "--calib", text, *FAST, "--out", tmp_path / "o"),
            "eval": ("eval", d, "--text", text),
            "recover": ("recover", d, "--text", text, "--steps", "1", "--out", tmp_path / "o")}[cmd]
    rc, _, err = invoke(*args)
    assert rc == 2 and phrase in error_line(err)
    assert not (tmp_path / "o").exists()


# 6. recipe files that do not parse
@pytest.mark.parametrize("name,content,phrase", [
    ("bad.yaml", "method: [wanda\n", "not valid YAML"),
    ("tab.yaml", "method:\twanda\n", "not valid YAML"),
    ("obj.yaml", "method: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
    ("deep.json", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("bad.json", "{'method': 1}", "not valid JSON"),
    ("r.txt", "method: wanda", ".yaml, .yml or .json"),
    ("bin.yaml", bytes(range(256)), "not UTF-8"),
    ("list.yaml", "- 1\n- 2\n", "mapping"),
])
@pytest.mark.parametrize("cmd", ["prune", "train-prune"])
def test_recipe_parse_errors(tiny_dir, tmp_path, name, content, phrase, cmd):
    d, text = tiny_dir
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    if cmd == "prune":
        rc, _, err = _prune(d, text, tmp_path / "o", "--recipe", f)
    else:
        rc, _, err = invoke("train-prune", "cnn", "--recipe", f, "--out", tmp_path / "o")
    assert rc == 2 and phrase in error_line(err)


# 7. an output that cannot be written fails before any work
@pytest.mark.parametrize("cmd", ["prune", "data-select", "data-score", "train-prune"])
def test_unwritable_output_fails_first(tiny_dir, tmp_path, cmd, monkeypatch):
    d, text = tiny_dir
    (tmp_path / "afile").write_text("x")
    calls = []
    monkeypatch.setattr(prunekit.api, "prune", lambda *a, **k: calls.append(1))
    for bad, phrase in ((tmp_path / "afile" / "o", "is a file"), (Path("/proc/prunekit-test/o"), "not writable")):
        if cmd == "prune":
            rc, _, err = _prune(d, text, bad)
        elif cmd == "train-prune":
            rc, _, err = invoke("train-prune", "cnn", "--dataset", "synthetic", "--out", bad)
        elif cmd == "data-score":
            rc, _, err = invoke("data", "score", "digits", "--score", "random", "--out", f"{bad}.parquet")
        else:
            rc, _, err = invoke("data", "select", tmp_path / "missing.parquet", "--keep", "0.5", "--out", f"{bad}.parquet")
        assert rc == 2 and phrase in error_line(err), err
    assert not calls
    rc, _, err = invoke("data", "score", "digits", "--score", "random", "--out", tmp_path)
    assert rc == 2


# 8. a local path that does not exist is not taken for a hub id
@pytest.mark.parametrize("name", ["./nope", "nope/", "/no/such/dir", "tiny-llama/typo"])
def test_missing_local_path_is_said_at_once(tiny_dir, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tiny_dir[0].parent)
    rc, _, err = invoke("eval", name)
    assert rc == 2 and "No such model directory" in error_line(err)


def test_hub_id_offline_is_said_at_once(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc, _, err = invoke("eval", "someone/some-model")
    assert rc == 2 and "cannot be reached" in error_line(err) and time.perf_counter() - t0 < 10


# 10. --device is checked before the model loads
@pytest.mark.parametrize("device,phrase", [("foo", "Unknown device"), ("cuda", "CUDA"), ("mps", "not supported")])
def test_device_checked_first(tiny_dir, tmp_path, device, phrase, monkeypatch):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d, text = tiny_dir
    loads = []
    monkeypatch.setattr(prunekit.io, "load_any", lambda *a, **k: loads.append(1))
    rc, _, err = _prune(d, text, tmp_path / "o", "--device", device)
    assert rc == 2 and phrase in error_line(err) and not loads


# 13. outputs are readable by others as the umask says
def test_output_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = prunekit.save(tiny_model("llama"), None, tmp_path / "o")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755


# 14. interruption edges
def _child(*args, **kw):
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def test_ctrl_c_while_importing_is_a_clean_exit():
    exe = Path(sys.executable).parent / "prunekit"
    if not exe.is_file():
        pytest.skip("the prunekit console script is not installed next to this python")
    p = _child(str(exe), "zoo")
    import time

    maps = Path(f"/proc/{p.pid}/maps")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 60 and p.poll() is None:  # wait until torch is being imported
        try:
            if "libtorch" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the imports finished before the signal")
    assert p.returncode == 130 and "Traceback" not in err, err


def test_ctrl_c_after_the_work_is_done_is_ignored():
    code = ("import atexit, os, signal, sys\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            "sys.argv = ['prunekit', 'zoo']\n"
            "from prunekit.cli import main\nmain()\n")
    p = _child(sys.executable, "-c", code)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert "smollm2-135m" in out


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    alive = tmp_path / f".o.tmp-{os.getppid()}-xyz"  # a run still going (our parent's pid) is left alone
    alive.mkdir()
    prunekit.save(tiny_model("llama"), None, tmp_path / "o")
    assert not stale.exists() and alive.exists()
    shutil.rmtree(alive)


# 9, 11, 12. data: a subset from other data, broken files, values out of range
@pytest.fixture
def data_files(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 6)).astype(np.float32), rng.integers(0, 3, 120)
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    np.savez(tmp_path / "same_size.npz", x=rng.normal(size=(120, 6)).astype(np.float32), y=rng.integers(0, 3, 120))
    xn = x.copy()
    xn[3, 2] = np.nan
    np.savez(tmp_path / "nan_x.npz", x=xn, y=y)
    yn = y.astype(float)
    yn[5] = np.nan
    np.savez(tmp_path / "nan_y.npz", x=x, y=yn)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "blank_label.csv").write_text("text,label\nhello,1\nworld,\n")
    return tmp_path


def test_subset_selected_on_other_data_is_refused(data_files):
    t = data_files
    assert invoke("data", "score", t / "ok.npz", "--score", "random", "--out", t / "s.parquet")[0] == 0
    assert invoke("data", "select", t / "s.parquet", "--keep", "0.5", "--out", t / "k.parquet")[0] == 0
    rc, _, err = invoke("data", "train", t / "same_size.npz", "--subset", t / "k.parquet", "--epochs", "1")
    assert rc == 2 and "other data" in error_line(err)
    rc, _, err = invoke("data", "train", t / "ok.npz", "--subset", t / "k.parquet", "--epochs", "1", "--model", "linear")
    assert rc == 0, err


@pytest.mark.parametrize("args,phrase", [
    (("score", "empty.csv", "--score", "random"), "is empty"),
    (("score", "blank_label.csv", "--score", "random"), "label is missing"),
    (("score", "nan_x.npz", "--score", "el2n"), "NaN or Inf feature"),
    (("score", "nan_y.npz", "--score", "el2n"), "label is missing"),
    (("score", "digits", "--score", "random", "--image-size", "0"), "--image-size"),
    (("score", "ok.npz", "--score", "el2n", "--seed", "-1"), "--seed"),
    (("score", "ok.npz", "--score", "el2n", "--epochs", "-1"), "--epochs"),
    (("score", "ok.npz", "--score", "prototype", "--clusters", "0"), "--clusters"),
    (("score", "ok.npz", "--score", "prototype", "--clusters", "1000"), "more than the 120"),
    (("score", "ok.npz", "--score", "el2n", "--model", "x"), "--model"),
    (("train", "ok.npz", "--lr", "-1"), "--lr"),
    (("train", "ok.npz", "--lr", "nan"), "--lr"),
    (("train", "ok.npz", "--batch-size", "0"), "--batch-size"),
    (("train", "ok.npz", "--seed", "-1"), "--seed"),
])
def test_data_values_out_of_range(data_files, args, phrase):
    out = ("--out", data_files / "o.parquet") if args[0] == "score" else ()
    rc, _, err = invoke("data", *[data_files / a if a.endswith((".csv", ".npz")) else a for a in args], *out)
    assert rc == 2 and phrase in error_line(err)
    assert not (data_files / "o.parquet").exists()


@pytest.mark.parametrize("temperature", ["0", "-1"])
def test_dbp_temperature_is_not_clamped(data_files, temperature):
    t = data_files
    assert invoke("data", "score", t / "ok.npz", "--score", "prototype", "--encoder", "pca", "--clusters", "4",
                  "--out", t / "p.parquet")[0] == 0
    rc, _, err = invoke("data", "select", t / "p.parquet", "--keep", "0.5", "--strategy", "dbp", "--temperature",
                        temperature, "--out", t / "k.parquet")
    assert rc == 2 and "--temperature" in error_line(err)


def test_evaluation_window_of_one_token(tiny_dir):
    d, text = tiny_dir
    rc, _, err = invoke("eval", d, "--text", text, "--seqlen", "1", "--no-bos")
    assert rc == 2 and "at least 2 tokens" in error_line(err)
