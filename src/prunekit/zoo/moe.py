"""A small mixture-of-experts language model trained here (no pretrained MoE ships with the packages this project
may use), for the expert pruning benchmark and tests.

A stock Hugging Face ``MixtralForCausalLM``: hidden 192, 4 layers, 6 query / 2 key-value heads, 8 experts per
layer of width 384, top-2 routing, tied embeddings (9.05M parameters, 7.1M of them experts), with a byte-level
BPE tokenizer of 8,192 tokens trained on the same mixture (with SmolLM2's 49,152-token vocabulary the output layer
dominated every training step on this CPU). Trained from scratch on an even mixture of two domains
the project ships, the calibration splits of Shakespeare (1.37M tokens of its tokenizer) and of the Python reference
(pydoc, 77k: it is seen 16 times over), windows of 128 tokens, half of every batch from each, AdamW (lr 1e-3,
one-cycle, weight decay 0.1), Mixtral's load-balancing loss (0.02), seed 0, with the project's one training loop.
Cached under ``$PRUNEKIT_CACHE/models/moe-mix-<steps>`` as a ``save_pretrained`` directory with its tokenizer and
a ``train.json`` (the recipe, the time and each domain's held-out perplexity), so ``prunekit prune <that
directory> --experts ...`` works on it like on any model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from prunekit.zoo.models import cache_dir

STEPS = 1200
VOCAB = 8192
SEQLEN = 128
BATCH = 16
DOMAINS = ("shakespeare", "pydoc")


def train_tokenizer():
    """A byte-level BPE tokenizer of :data:`VOCAB` tokens trained on the two calibration splits (pydoc repeated to
    weigh as much as Shakespeare), with ``<|endoftext|>`` as its begin / end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.zoo.text import load_text

    texts = {d: load_text(d, "calibration") for d in DOMAINS}
    reps = max(1, round(len(texts["shakespeare"]) / len(texts["pydoc"])))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = [texts["shakespeare"][i:i + 100_000] for i in range(0, len(texts["shakespeare"]), 100_000)]
    chunks += [texts["pydoc"][i:i + 100_000] for i in range(0, len(texts["pydoc"]), 100_000)] * reps
    tok.train_from_iterator(chunks, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  model_max_length=512)


def moe_config(vocab: int = VOCAB):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True,
                         router_aux_loss_coef=0.02, output_router_logits=False, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)


def domain_ids(tokenizer, split: str) -> dict[str, torch.Tensor]:
    """Each domain's ``split`` as one long row of token ids."""
    from prunekit.batches import tokenize
    from prunekit.zoo.text import load_text

    return {d: tokenize(tokenizer, load_text(d, split)) for d in DOMAINS}


def moe_dir(steps: int = STEPS) -> Path:
    return cache_dir() / "models" / f"moe-mix-{steps}"


def mix_moe(steps: int = STEPS, progress: bool = True) -> Path:
    """The directory of the trained model, training it once if it is not cached."""
    from transformers import MixtralForCausalLM

    from prunekit.core.loop import make_optimizer, make_schedule, train_loop
    from prunekit.core.progress import say
    from prunekit.io import atomic_dir, write_json

    out = moe_dir(steps)
    if (out / "train.json").is_file():
        return out
    tok = train_tokenizer()
    say(f"training the two-domain MoE once ({steps} steps of {BATCH} x {SEQLEN} tokens, cached in {out})")
    torch.manual_seed(0)
    model = MixtralForCausalLM(moe_config(len(tok)))
    model.config.output_router_logits = True  # the load-balancing loss is part of the training loss
    ids = domain_ids(tok, "calibration")
    g = torch.Generator().manual_seed(0)
    half = BATCH // 2

    def batches():
        for _ in range(steps):
            rows = []
            for d in DOMAINS:
                src = ids[d]
                starts = torch.randint(0, src.numel() - SEQLEN, (half,), generator=g).tolist()
                rows += [src[s:s + SEQLEN] for s in starts]
            yield torch.stack(rows)

    opt = make_optimizer(model.parameters(), "adamw", 1e-3, weight_decay=0.1)
    sched = make_schedule(opt, "onecycle", steps, pct_start=0.05)

    def loss_fn(m, batch):
        out_ = m(input_ids=batch, labels=batch, use_cache=False)
        return out_.loss, out_.logits

    t0 = time.perf_counter()
    model.train()
    train_loop(model, opt, [batches()], loss_fn, scheduler=sched, total=steps, desc="train MoE", progress=progress)
    seconds = time.perf_counter() - t0
    model.config.output_router_logits = False
    model.eval()
    ppl = held_out_perplexity(model, tok)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(Path(tmp) / "train.json", {
            "steps": steps, "batch": BATCH, "seqlen": SEQLEN, "mixture": "half of every batch from each of "
            + " and ".join(f"{d} (calibration split)" for d in DOMAINS), "optimizer": "adamw 1e-3 wd 0.1",
            "schedule": "onecycle, 5% warm-up", "router_aux_loss_coef": 0.02, "seed": 0, "train_seconds": seconds,
            "held_out_perplexity": ppl, "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_domain": {d: int(v.numel()) for d, v in ids.items()},
            "epochs_per_domain": {d: steps * half * SEQLEN / v.numel() for d, v in ids.items()},
            "tokenizer": f"byte-level BPE, {VOCAB} tokens, trained on the same calibration splits",
            "config": json.loads(model.config.to_json_string())})
    say(f"MoE trained in {seconds / 60:.1f} min: held-out perplexity {ppl}")
    return out


@torch.no_grad()
def held_out_perplexity(model, tokenizer, windows: int = 32, seqlen: int = SEQLEN) -> dict[str, float]:
    """Perplexity on the first ``windows`` windows of each domain's evaluation split."""
    from prunekit.batches import evaluation_windows
    from prunekit.evaluate import perplexity

    out = {}
    for d, ids in domain_ids(tokenizer, "evaluation").items():
        out[d] = float(perplexity(model, evaluation_windows(ids, seqlen, windows), progress=False))
    return out


def load_mix_moe(steps: int = STEPS, progress: bool = True):
    """``(model, tokenizer)`` of the trained two-domain MoE (eval mode, float32)."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    path = mix_moe(steps, progress)
    return (MixtralForCausalLM.from_pretrained(path, trust_remote_code=False).eval(),
            AutoTokenizer.from_pretrained(path, trust_remote_code=False))


def upcycle_smollm2(experts: int = 8, top_k: int = 2, noise: float = 0.01, seed: int = 0):
    """SmolLM2-135M sparse-upcycled into a stock Mixtral (Komatsuzaki et al.): its attention, norms and embeddings
    as they are, each layer's MLP copied into ``experts`` experts with ``noise`` x the weight's std of Gaussian
    noise added to each copy, a random router (std 0.02). With ``noise=0`` it computes exactly what SmolLM2
    computes (the renormalised top-k weights sum to 1); the router is not trained, so it is a model for measuring
    size and speed (per-token compute, memory), not quality. ``(model, tokenizer)``, about 0.7B parameters."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from prunekit.zoo.models import load_model

    dense, tok = load_model("smollm2-135m")
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
                        num_local_experts=experts, num_experts_per_tok=top_k, bos_token_id=c.bos_token_id,
                        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    moe = moe.to_empty(device="cpu")
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(dense.model.layers, moe.model.layers)):
            gu = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight])
            dn = src.mlp.down_proj.weight
            for e in range(experts):
                dst.mlp.experts.gate_up_proj[e] = gu + noise * gu.std() * torch.randn(gu.shape, generator=g)
                dst.mlp.experts.down_proj[e] = dn + noise * dn.std() * torch.randn(dn.shape, generator=g)
            dst.mlp.gate.weight.copy_(0.02 * torch.randn(dst.mlp.gate.weight.shape, generator=g))
        moe.model.rotary_emb = type(moe.model.rotary_emb)(config=cfg)  # buffers were on meta
        for layer in moe.model.layers:
            if hasattr(layer.self_attn, "rotary_emb"):
                layer.self_attn.rotary_emb = type(layer.self_attn.rotary_emb)(config=cfg)
    moe.tie_weights()
    return moe.eval(), tok
