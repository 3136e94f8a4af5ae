"""Disk-streamed pruning: equal to the in-memory path, resumable after a failure at any block, refuses bad input,
memory bounded by a block, and the compressed-tensors layout round-trips."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit import api
from prunekit.errors import PruneError
from prunekit.io import load_any
from prunekit.stream import engine, prune_checkpoint, work_dir
from tests.conftest import VOCAB, byte_tokenizer, error_line, invoke, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _save_dir(path: Path, dtype=torch.float32, layers: int = 4, **kw) -> Path:
    m = tiny_model("llama", layers=layers, **kw).to(dtype)
    m.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {"fp32": _save_dir(root / "fp32"), "bf16": _save_dir(root / "bf16", torch.bfloat16)}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(tensors(d).items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes() if v.dim() else v.reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


RECIPES = {
    "wanda": dict(method="wanda", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "magnitude": dict(method="magnitude", sparsity=0.6),
    "wanda-owl": dict(method="wanda", sparsity=0.5, allocation={"kind": "owl", "owl_m": 2.0, "owl_lambda": 0.1}),
    "sparsegpt-global": dict(method="sparsegpt", sparsity=0.5, allocation={"kind": "global", "min_density": 0.2}),
    "magnitude-lamp": dict(method="magnitude", sparsity=0.5, allocation={"kind": "lamp"}),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-one-pass": dict(method="sparsegpt", sparsity=0.4, calibration={"mode": "one-pass"}),
    "wanda-exclude": dict(method="wanda", sparsity=0.5, exclude=["*.mlp.down_proj"]),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_streamed_equals_in_memory(ckpts, ids, tmp_path, dtype, name):
    src = ckpts[dtype]
    mem, _ = load_any(src)  # fp32 compute, as the streamed path
    mem, rep = api.prune(mem, RECIPES[name], ids, progress=False)
    out = tmp_path / "out"
    srep = prune_checkpoint(src, out, RECIPES[name], ids, progress=False)
    got, want = tensors(out), mem.state_dict()
    assert set(got) <= set(want) and len(got) > 0
    stored = torch.float32 if dtype == "fp32" else torch.bfloat16
    for k, v in got.items():
        assert v.dtype == stored, k  # the stored dtype is kept
        assert torch.equal(v, want[k].to(stored)), k
    assert srep.layers == rep.layers
    assert srep.summary["target_sparsity"] == rep.summary["target_sparsity"]
    assert srep.summary["params"] == rep.summary["params"] and srep.summary["nonzeros"] == rep.summary["nonzeros"]
    # the output loads with stock transformers and computes what the in-memory model computes
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    for p in mem.parameters():  # the weights as stored (buffers such as rotary frequencies stay fp32)
        p.data = p.data.to(stored).to(torch.float32)
    ref = mem
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, ref(ids[:2]).logits)
    assert not work_dir(out).exists()  # the checkpoint is gone once the output is in place
    man = json.loads((out / "prunekit.json").read_text())
    assert man["kind"] == "llm" and man["summary"]["stream"]["stored_dtype"] == ("float32" if dtype == "fp32" else "bfloat16")


class Boom(RuntimeError):
    pass


def _fail_at(monkeypatch, k: int):
    def fail(bi):
        if bi == k:
            raise Boom(f"injected failure after block {bi}")

    monkeypatch.setattr(engine, "_after_commit", fail)


@pytest.mark.parametrize("recipe", ["sparsegpt", "wanda-owl", "magnitude"])
def test_resume_after_failure_at_every_block(ckpts, ids, tmp_path, monkeypatch, recipe):
    src, rec = ckpts["bf16"], RECIPES[recipe]
    whole = tmp_path / "whole"
    prune_checkpoint(src, whole, rec, ids, progress=False)
    want = digest(whole)
    for k in range(4):
        out = tmp_path / f"out{k}"
        with monkeypatch.context() as mp:
            _fail_at(mp, k)
            with pytest.raises(Boom):
                prune_checkpoint(src, out, rec, ids, progress=False)
        assert not out.exists()  # nothing half-written looks like a result
        state = json.loads((work_dir(out) / "state.json").read_text())
        assert state["done"] == k
        loaded: list[int] = []
        real_load = engine.BlockStream.load
        with monkeypatch.context() as mp:
            mp.setattr(engine.BlockStream, "load", lambda self, bi: (loaded.append(bi), real_load(self, bi))[1])
            rep = prune_checkpoint(src, out, rec, ids, progress=False, resume=True)
        assert digest(out) == want, f"resumed after block {k} differs from the uninterrupted run"
        assert rep.summary["stream"]["resumed_at_block"] == k + 1
        pruned_again = {b for b in loaded if b <= k} - {0}  # block 0 is read once for its output shape
        assert not pruned_again, f"blocks {pruned_again} were pruned again after resuming at {k + 1}"
        assert not work_dir(out).exists()


def test_sigkill_then_resume_cli(ckpts, tmp_path):
    """A run killed with SIGKILL at block 2 and resumed from the command line equals an uninterrupted run."""
    src = ckpts["bf16"]
    text = tmp_path / "text.txt"
    import pydoc_data.topics as t

    text.write_text("\n".join(list(t.topics.values())[:40]))
    args = ["prune", str(src), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", str(text), "--calib-samples",
            "8", "--seqlen", "32", "--stream", "--quiet"]
    rc, _, err = invoke(*args, "--out", tmp_path / "whole")
    assert rc == 0, err
    script = (
        "import os, signal, sys\n"
        "from prunekit.stream import engine\n"
        "def kill(bi):\n"
        "    if bi == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "engine._after_commit = kill\n"
        "from prunekit.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", script, *args, "--out", str(out)], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists() and json.loads((work_dir(out) / "state.json").read_text())["done"] == 2
    rc, stdout, err = invoke(*args, "--out", out, "--resume")
    assert rc == 0, err
    assert "resumed after block 2" in stdout
    assert digest(out) == digest(tmp_path / "whole")


def test_resume_from_a_different_run_is_refused(ckpts, ids, tmp_path, monkeypatch):
    src, out = ckpts["fp32"], tmp_path / "out"
    with monkeypatch.context() as mp:
        _fail_at(mp, 1)
        with pytest.raises(Boom):
            prune_checkpoint(src, out, RECIPES["wanda"], ids, progress=False)
    with pytest.raises(PruneError, match="different run \\(its recipe differs\\)"):
        prune_checkpoint(src, out, {**RECIPES["wanda"], "sparsity": 0.6}, ids, progress=False, resume=True)
    with pytest.raises(PruneError, match="its calibration differs"):
        prune_checkpoint(src, out, RECIPES["wanda"], ids.flip(0), progress=False, resume=True)
    with pytest.raises(PruneError, match="its model differs"):
        prune_checkpoint(ckpts["bf16"], out, RECIPES["wanda"], ids, progress=False, resume=True)
    with pytest.raises(PruneError, match="its format differs"):
        prune_checkpoint(src, out, RECIPES["wanda"], ids, progress=False, resume=True, format="compressed-tensors")
    assert not out.exists() and work_dir(out).exists()  # the checkpoint is left for the right run
    # without --resume the earlier checkpoint is started over
    prune_checkpoint(src, out, {**RECIPES["wanda"], "sparsity": 0.6}, ids, progress=False)
    assert tensors(out) and not work_dir(out).exists()


def test_cli_refusals(ckpts, tmp_path, monkeypatch):
    src = ckpts["fp32"]
    rc, _, err = invoke("prune", src, "--method", "wanda", "--out", tmp_path / "o", "--resume")
    assert rc == 2 and "works with --stream" in error_line(err)
    rc, _, err = invoke("prune", src, "--method", "wanda", "--out", tmp_path / "o", "--stream", "--format", "gguf")
    assert rc == 2 and "Unknown --format 'gguf'" in error_line(err)
    rc, _, err = invoke("prune", src, "--method", "gblm", "--out", tmp_path / "o", "--stream")
    assert rc == 2 and "GBLM" in error_line(err)
    rc, _, err = invoke("prune", src, "--structure", "heads", "--sparsity", "0.5", "--out", tmp_path / "o", "--stream")
    assert rc == 2 and "Structured pruning is not streamed" in error_line(err)
    (tmp_path / "afile").write_text("x")
    rc, _, err = invoke("prune", src, "--method", "magnitude", "--out", tmp_path / "o", "--stream", "--offload-dir",
                        tmp_path / "afile")
    assert rc == 2 and "is a file" in error_line(err)
    # not enough disk: refused before any work, nothing written
    import prunekit.stream as st

    monkeypatch.setattr(st.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    rc, _, err = invoke("prune", src, "--method", "magnitude", "--out", tmp_path / "o", "--stream")
    assert rc == 2 and "GiB is free" in error_line(err)
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


def test_bad_checkpoints_refused(tmp_path, ids):
    pick = _save_dir(tmp_path / "pickle", layers=2)
    for f in pick.glob("*.safetensors"):  # only a pickle left
        f.unlink()
    torch.save({"x": torch.zeros(1)}, pick / "pytorch_model.bin")
    with pytest.raises(PruneError, match="only pickle weights"):
        prune_checkpoint(pick, tmp_path / "o1", RECIPES["wanda"], ids, progress=False)
    quant = _save_dir(tmp_path / "quant", layers=2)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PruneError, match="quantized checkpoint"):
        prune_checkpoint(quant, tmp_path / "o2", RECIPES["wanda"], ids, progress=False)
    f8 = tmp_path / "f8"
    _save_dir(f8, layers=2)
    from safetensors.torch import save_file

    sd = tensors(f8)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    for f in f8.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(f8 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PruneError, match="float8_e4m3fn|F8_E4M3.*cannot compute"):
        prune_checkpoint(f8, tmp_path / "o3", RECIPES["wanda"], ids, progress=False)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_offload_dir_equals_memory(ckpts, ids, tmp_path):
    src = ckpts["bf16"]
    prune_checkpoint(src, tmp_path / "mem", RECIPES["sparsegpt"], ids, progress=False)
    off = tmp_path / "offload"
    prune_checkpoint(src, tmp_path / "disk", RECIPES["sparsegpt"], ids, progress=False, offload_dir=off)
    assert digest(tmp_path / "disk") == digest(tmp_path / "mem")
    assert off.is_dir() and not any(off.rglob("*.safetensors"))  # spilled activations are cleaned up
    prune_checkpoint(src, tmp_path / "disk1p", RECIPES["sparsegpt-one-pass"], ids, progress=False, offload_dir=off)
    prune_checkpoint(src, tmp_path / "mem1p", RECIPES["sparsegpt-one-pass"], ids, progress=False)
    assert digest(tmp_path / "disk1p") == digest(tmp_path / "mem1p")


@pytest.mark.parametrize("recipe", ["wanda", "wanda-2:4"])
def test_compressed_tensors_round_trip(ckpts, ids, tmp_path, recipe):
    src = ckpts["bf16"]
    prune_checkpoint(src, tmp_path / "dense", RECIPES[recipe], ids, progress=False)
    rep = prune_checkpoint(src, tmp_path / "ct", RECIPES[recipe], ids, progress=False, format="compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["sparsity_config"]["format"] == ("sparse-24-bitmask" if "2:4" in recipe else "sparse-bitmask")
    stored = tensors(tmp_path / "ct")
    assert any(k.endswith(".bitmask") for k in stored) and not any(k.endswith("q_proj.weight") for k in stored)
    from prunekit.stream.export import decompress

    dense = tensors(tmp_path / "dense")
    back = decompress(stored)
    assert set(back) == set(dense)
    assert all(torch.equal(back[k], dense[k]) for k in dense)
    assert rep.summary["disk_bytes"] < sum(f.stat().st_size for f in (tmp_path / "dense").glob("*.safetensors"))
    model, _ = load_any(tmp_path / "ct")  # prunekit.load decompresses
    ref, _ = load_any(tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(model(ids[:2]).logits, ref(ids[:2]).logits)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["wanda", "wanda-2:4"])
def test_compressed_tensors_package_decompresses_it(ckpts, ids, tmp_path_factory, tmp_path, recipe):
    """compressed-tensors 0.14.0.1 (the last release with sparse compressors) reads the output's config and
    decompresses its weights to exactly the dense output's. It is installed apart (--no-deps: it asks for
    transformers<5) with its one other import, loguru."""
    target = tmp_path_factory.getbasetemp() / "ct014"
    if not (target / "compressed_tensors").is_dir():
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                            "compressed-tensors==0.14.0.1", "loguru==0.7.3"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
    src = ckpts["bf16"]
    prune_checkpoint(src, tmp_path / "dense", RECIPES[recipe], ids, progress=False)
    prune_checkpoint(src, tmp_path / "ct", RECIPES[recipe], ids, progress=False, format="compressed-tensors")
    script = (
        "import sys, torch\n"
        "from compressed_tensors.compressors import ModelCompressor\n"
        "from safetensors.torch import save_file\n"
        "mc = ModelCompressor.from_pretrained(sys.argv[1])\n"
        "assert mc is not None and mc.sparsity_compressor is not None, 'no sparsity compressor'\n"
        "out = {k: v.contiguous() for k, v in mc.sparsity_compressor.decompress(sys.argv[1])}\n"
        "save_file(out, sys.argv[2])\n"
        "print(len(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ct"), str(tmp_path / "back.safetensors")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    back = load_file(str(tmp_path / "back.safetensors"))
    dense = tensors(tmp_path / "dense")
    compressed = [k for k in dense if k.endswith("proj.weight")]
    assert int(p.stdout.split()[-1]) >= len(compressed) > 0
    for k in compressed:
        assert torch.equal(back[k], dense[k]), k


_MEMORY_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from tests.conftest import VOCAB
from prunekit.stream import prune_checkpoint
torch.set_num_threads(1)
ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
prune_checkpoint(sys.argv[1], sys.argv[2] + "-warm", {"method": "sparsegpt", "sparsity": 0.5}, ids, progress=False)
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
prune_checkpoint(sys.argv[1], sys.argv[2], {"method": "sparsegpt", "sparsity": 0.5}, ids, progress=False)
print(max(0, status("VmHWM:") - base))
"""


def test_peak_memory_grows_with_a_block_not_with_depth(tmp_path):
    """Peak RSS of a streamed run over its baseline: a 16-layer model needs about what a 4-layer one does
    (in memory it would need 4x the weights)."""
    growth = {}
    for layers in (4, 16):
        d = _save_dir(tmp_path / f"m{layers}", torch.bfloat16, layers=layers, hidden=384)
        p = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(d), str(tmp_path / f"o{layers}"), str(ROOT)],
                           capture_output=True, text=True,
                           # tensors this small would otherwise come from glibc's heap, whose fragmentation hides
                           # what is freed; real blocks' tensors are far above the threshold and always mmapped
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": "65536"})
        assert p.returncode == 0, p.stderr[-3000:]
        growth[layers] = int(p.stdout.split()[-1])  # KiB
    block_kib = (4 * 384 * 384 + 3 * 384 * 768) * 4 // 1024  # one block's weights in fp32
    weights16_kib = 16 * block_kib
    assert growth[16] < growth[4] + 2 * block_kib, growth
    assert growth[16] < weights16_kib / 2, (growth, weights16_kib)
