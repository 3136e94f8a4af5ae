"""GPU check of the calibration engine's device path (``prunekit.prune(..., device="cuda")``).

A random Llama-style model (GQA) is pruned twice from the same weights: on the CPU and with the blocks moved one
at a time to the GPU. Prints, per method and pattern: seconds on each, the share of mask entries that agree,
and the relative difference of the pruned models' logits. Wanda's masks should agree exactly (up to float
summation order); SparseGPT's choices depend on every earlier update, so float differences between the devices grow
through the blocks: the check that matters is that both pruned models are equally far from the dense one.
Needs a CUDA device.

    python benchmarks/device_check.py            # on a GPU machine, with src/ on PYTHONPATH
    python benchmarks/device_check.py --stream   # also: a large bf16 checkpoint streamed block by block on the GPU

``--stream`` writes a Llama of 7B-class block shapes (hidden 4096, intermediate 11008, GQA 32/8 heads; 8 layers
by default, ``--layers``) in bf16 to a temporary directory and prunes it with ``prunekit.prune_checkpoint`` on the
CPU and with one block at a time on the GPU: seconds, peak GPU memory (one block + activations expected), the
share of mask entries that agree.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit
from prunekit.arch import adapter_for, target_layers
from prunekit.linear import weight_matrix


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (32, 512))
    probe = torch.randint(0, cfg.vocab_size, (2, 128))
    print(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    with torch.no_grad():
        dense_logits = base(input_ids=probe).logits
    print(f"{'method':<10} {'pattern':<13} {'cpu s':>7} {'gpu s':>7} {'mask agree':>11} {'cpu vs gpu':>11} "
          f"{'cpu vs dense':>13} {'gpu vs dense':>13}   (logit differences relative to the first's norm)")
    for method in ("wanda", "sparsegpt"):
        for pattern in ("unstructured", "2:4"):
            cpu, gpu = copy.deepcopy(base), copy.deepcopy(base)
            t0 = time.perf_counter()
            prunekit.prune(cpu, {"method": method, "pattern": pattern}, ids, progress=False)
            t_cpu = time.perf_counter() - t0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prunekit.prune(gpu, {"method": method, "pattern": pattern}, ids, device="cuda", progress=False)
            torch.cuda.synchronize()
            t_gpu = time.perf_counter() - t0
            assert all(p.device.type == "cpu" for p in gpu.parameters()), "model not returned to the CPU"
            agree, total = 0, 0
            for (_, a), (_, b) in zip(*[[t for blk in target_layers(m, adapter_for(m)) for t in blk] for m in (cpu, gpu)]):
                ma, mb = weight_matrix(a) == 0, weight_matrix(b) == 0
                agree += int((ma == mb).sum())
                total += ma.numel()
            with torch.no_grad():
                la, lb = cpu(input_ids=probe).logits, gpu(input_ids=probe).logits
            rel = float((la - lb).norm() / la.norm())
            to_dense = [float((x - dense_logits).norm() / dense_logits.norm()) for x in (la, lb)]
            print(f"{method:<10} {pattern:<13} {t_cpu:7.2f} {t_gpu:7.2f} {agree / total:11.6f} {rel:11.2e} "
                  f"{to_dense[0]:13.3f} {to_dense[1]:13.3f}", flush=True)


def stream_check(layers: int) -> None:
    import sys
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_scale import SHAPES, make_checkpoint

    shape = {**SHAPES["7b"], "num_hidden_layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ckpt"
        make_checkpoint(src, shape)
        ids = torch.randint(0, 256, (16, 512), generator=torch.Generator().manual_seed(0))
        print(f"streamed: {layers} layers of 7B-class shapes in bf16, {ids.shape[0]} x {ids.shape[1]} calibration tokens")
        print(f"{'method':<10} {'cpu s':>7} {'gpu s':>7} {'gpu peak GiB':>13} {'mask agree':>11}")
        for method in ("wanda", "sparsegpt"):
            outs, secs = {}, {}
            for dev in ("cpu", "cuda"):
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                prunekit.prune_checkpoint(src, Path(tmp) / f"{method}-{dev}", {"method": method, "sparsity": 0.5}, ids,
                                          device=dev, progress=False)
                torch.cuda.synchronize()
                secs[dev] = time.perf_counter() - t0
                outs[dev] = {}
                for f in (Path(tmp) / f"{method}-{dev}").glob("*.safetensors"):
                    outs[dev].update(load_file(str(f)))
            agree = total = 0
            for k, v in outs["cpu"].items():
                if k.endswith("proj.weight"):
                    agree += int(((v == 0) == (outs["cuda"][k] == 0)).sum())
                    total += v.numel()
            print(f"{method:<10} {secs['cpu']:7.1f} {secs['cuda']:7.1f} {torch.cuda.max_memory_allocated() / 2**30:13.2f} "
                  f"{agree / total:11.6f}", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    main()
    if a.stream:
        stream_check(a.layers)
