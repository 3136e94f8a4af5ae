"""Peer baseline: LLMLingua / LongLLMLingua prompt compression (PyPI llmlingua==0.2.2).

Usage:  python benchmarks/context_peer.py IN.json OUT.json

IN:  {"model_dir", "rates": [kept fraction of context tokens], "modes": ["llmlingua",
      "longllmlingua"], "items": [{"question", "passages": [str]}]}
OUT: {"llmlingua_version", "notes", "results": {"<mode>@<rate>": [{"passages", "order",
      "seconds", "origin_tokens", "compressed_tokens", "kept_tokens"}]}}

llmlingua (+ tiktoken, nltk) is pip-installed with --no-deps into
~/.cache/prunekit/peers/llmlingua on first use and put first on sys.path; the scorer
is the local causal LM in model_dir (CPU, float32, 2 threads), fully offline.

Shims / patches (all from outside, llmlingua's files are untouched; also in "notes"):
* tiktoken.encoding_for_model is replaced (it downloads cl100k_base) by an object whose
  encode/decode use the local model's tokenizer; llmlingua only uses it for its returned
  origin_tokens/compressed_tokens, which we do not report.
* nltk: only sent_tokenize in the sentence-level filter needs punkt data; both modes run
  with use_sentence_level_filter=False, so no punkt and no stand-in are needed.
* transformers 5: the model returns a DynamicCache (no [i][j] indexing, iterates as
  (k, v, sliding) triples) and rejects legacy lists of (k, v). The model is wrapped so
  that legacy caches are converted to DynamicCache on input and back to a tuple of
  (k, v) on output -- exactly what llmlingua 0.2.2 expects.
* Per-passage mapping (observation only, no behaviour change): get_compressed_input is
  called with a keep_flag of token positions + 2 (never 0/1, so it forces nothing and
  suppresses nothing -- identical to keep_flag=None); llmlingua filters it with the same
  mask as the ids, so the final keep_flag gives the exact original positions of the kept
  tokens, mapped to passages through the tokenizer's character offsets.
"""
import bisect, json, os, subprocess, sys, time

PEER_DIR = os.path.expanduser("~/.cache/prunekit/peers/llmlingua")
VERSION = "0.2.2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ensure_llmlingua():
    meta = os.path.join(PEER_DIR, f"llmlingua-{VERSION}.dist-info")
    if not (os.path.isdir(meta) and os.path.isdir(os.path.join(PEER_DIR, "tiktoken"))
            and os.path.isdir(os.path.join(PEER_DIR, "nltk"))):
        # the venv already has transformers, accelerate, torch, numpy, regex, requests,
        # yaml, click, joblib, tqdm: only these three are missing
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                               "--target", PEER_DIR, f"llmlingua=={VERSION}", "tiktoken",
                               "nltk"])
    sys.path.insert(0, PEER_DIR)


class LocalTiktoken:
    """Stand-in for tiktoken.Encoding using the scorer's own tokenizer."""
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, **_):
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids, **_):
        return self.tok.decode(ids)


class LegacyKVModel:
    """Model proxy: legacy (k, v) caches in/out around a transformers-5 model."""
    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kw):
        from transformers import DynamicCache
        pkv = kw.get("past_key_values")
        if isinstance(pkv, (list, tuple)):
            kw["past_key_values"] = DynamicCache(ddp_cache_data=[(k, v) for k, v in pkv])
        out = self.model(*args, **kw)
        if getattr(out, "past_key_values", None) is not None and not isinstance(
                out.past_key_values, tuple):
            out.past_key_values = tuple((l.keys, l.values) for l in out.past_key_values.layers)
        return out


def install_trace(pc, trace):
    import torch
    orig_gci, orig_icp = pc.get_compressed_input, pc.iterative_compress_prompt
    orig_ccb = pc.control_context_budget

    def gci(loss, input_ids, attention_mask, *a, keep_flag=None, **kw):
        if keep_flag is None:
            assert "ids0" not in trace, "keep_flag lost (keep_split is not supported)"
            trace["ids0"] = input_ids[0].tolist()
            keep_flag = torch.arange(input_ids.shape[1], device=input_ids.device) + 2
        out = orig_gci(loss, input_ids, attention_mask, *a, keep_flag=keep_flag, **kw)
        trace["pos"] = (out[2] - 2).tolist()
        return out

    def icp(context, *a, **kw):
        trace["ctx"], trace["start"] = list(context), kw.get("start", 0)
        ret = orig_icp(context, *a, **kw)
        trace["out"] = ret[0][0].tolist()
        return ret

    def ccb(*a, **kw):
        ret = orig_ccb(*a, **kw)
        trace["used"] = list(ret[2])
        return ret

    pc.get_compressed_input, pc.iterative_compress_prompt = gci, icp
    pc.control_context_budget = ccb


def split_back(tok, trace, passages):
    """Per-passage compressed strings + order, from the traced kept token positions."""
    ctx, start = trace["ctx"], trace["start"]
    text = "\n\n".join(ctx)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids0 = trace.get("ids0", enc["input_ids"])
    assert enc["input_ids"] == ids0, "re-tokenisation differs from llmlingua's"
    offs = enc["offset_mapping"]
    pos = [p for p in trace.get("pos", range(len(ids0))) if p >= start]
    out = trace["out"]
    if len(pos) < len(out):  # KV-cache eviction (>max_position_embeddings) popped a
        # prefix out of the tracked tensor: align it greedily (leftmost) instead
        head, j, lim = [], start, pos[0] if pos else len(ids0)
        for t in out[:len(out) - len(pos)]:
            while j < lim and ids0[j] != t:
                j += 1
            assert j < lim, "could not align evicted prefix"
            head.append(j)
            j += 1
        pos = head + pos
    assert [ids0[p] for p in pos] == out, "kept positions do not reproduce output ids"
    slots = ctx[1:] if start else ctx
    order = trace.get("used", list(range(len(passages))))
    assert [passages[i] for i in order] == slots, "context order not recovered"
    spans, o = [], len(ctx[0]) + 2 if start else 0
    for c in slots:
        spans.append((o, o + len(c)))
        o += len(c) + 2
    starts = [s for s, _ in spans]
    pieces, cover = [[] for _ in slots], [s for s, _ in spans]
    kept = 0
    for p in pos:
        s, e = offs[p]
        k = max(0, bisect.bisect_right(starts, s) - 1)
        hit = False
        while k < len(spans) and spans[k][0] < e:
            a, b = max(s, cover[k]), min(e, spans[k][1])
            if a < b:
                pieces[k].append(text[a:b])
                cover[k], hit = b, True
            k += 1
        kept += hit
    res = [""] * len(passages)
    for slot, i in enumerate(order):
        res[i] = "".join(pieces[slot])
    return res, order, kept


MODE_KW = {
    # original LLMLingua, token level only: iterative token-level compression over the
    # whole context, no coarse (context/sentence) filters, keep_split default False
    "llmlingua": dict(use_context_level_filter=False, use_sentence_level_filter=False,
                      use_token_level_filter=True, rank_method="llmlingua"),
    # README recipe for LongLLMLingua
    "longllmlingua": dict(rank_method="longllmlingua", condition_in_question="after_condition",
                          reorder_context="sort", dynamic_context_compression_ratio=0.3,
                          condition_compare=True, context_budget="+100"),
}


def main(inp, outp):
    cfg = json.load(open(inp))
    ensure_llmlingua()
    import torch
    torch.set_num_threads(2)
    import tiktoken
    import llmlingua
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    tiktoken.encoding_for_model = lambda *_a, **_k: LocalTiktoken(tok)
    pc = llmlingua.PromptCompressor(model_name=cfg["model_dir"], device_map="cpu",
                                    model_config={"trust_remote_code": False})
    pc.model.eval()
    pc.model = LegacyKVModel(pc.model)
    trace = {}
    install_trace(pc, trace)
    ntok = lambda s: len(tok(s, add_special_tokens=False).input_ids) if s else 0
    notes = [
        f"llmlingua {llmlingua.__version__} scorer = {cfg['model_dir']} (CPU, float32, 2 threads)",
        "tiktoken.encoding_for_model('gpt-3.5-turbo') replaced by the scorer's tokenizer "
        "(cl100k_base cannot be downloaded offline)",
        "nltk punkt not needed: sentence-level filter off in both modes (no stand-in)",
        "transformers 5: model wrapped to convert legacy (k,v) past_key_values <-> DynamicCache",
        "per-passage outputs from exact kept token positions (traced through keep_flag, "
        "behaviour-neutral), cut at passage character boundaries; '' = dropped/emptied",
        "rate passed as target_token = rate * context tokens (llmlingua's own rate formula "
        "charges the question to the budget); counts are contexts only, scorer tokenizer",
        "llmlingua: " + json.dumps(MODE_KW["llmlingua"]) + " (keep_split=False: its "
        "split_token_id=13 is Llama-2's newline and never occurs with this tokenizer)",
        "longllmlingua: " + json.dumps(MODE_KW["longllmlingua"]) + "; 'order' lists only "
        "passages kept by the context-level filter, in prompt order",
        "achieved rate is llmlingua's own (per-window loss thresholds), not forced: "
        "expect per-item deviations of ~0.1 from the target; see kept_tokens",
    ]
    results = {}
    for mode in cfg["modes"]:
        for rate in cfg["rates"]:
            rows = []
            for it in cfg["items"]:
                ps, q = list(it["passages"]), it["question"]
                origin = sum(ntok(p) for p in ps)
                trace.clear()
                t0 = time.perf_counter()
                pc.compress_prompt(context=ps, question=q, rate=rate,
                                   target_token=rate * origin, **MODE_KW[mode])
                sec = time.perf_counter() - t0
                outs, order, kept = split_back(tok, trace, ps)
                rows.append({"passages": outs, "order": order, "seconds": sec,
                             "origin_tokens": origin,
                             "compressed_tokens": sum(ntok(s) for s in outs),
                             "kept_tokens": kept})
            results[f"{mode}@{rate}"] = rows
    json.dump({"llmlingua_version": llmlingua.__version__, "notes": notes,
               "results": results}, open(outp, "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
