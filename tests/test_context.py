"""Context pruning (prunekit.context): sentence splitting, the selection rule, every method's contract, LLMLingua
against a direct computation on a tiny causal LM, the scorers, the reader's batched log-likelihood, the built
question sets, and the CLI's refusals."""

import json

import pytest
import torch

import prunekit.context as C
from tests.conftest import byte_tokenizer, error_line, invoke, tiny_model
from prunekit.context import lm as L
from prunekit.context.methods import select
from prunekit.core.masks import keep_highest
from prunekit.errors import PruneError

Q = "In which year was the old lighthouse of Varnholm built?"
PASSAGES = [
    "Harbors of the north. The harbor of Varnholm is busy in summer. Fishing boats leave before dawn and come "
    "back at noon. The old lighthouse of Varnholm was built in the year 1862. Tourists climb it on Sundays.",
    "A recipe for bread. Mix flour, water and salt. Let the dough rest for an hour. Bake it until the crust is "
    "brown and it sounds hollow.",
    "On rivers. Rivers carry water to the sea. Some of them freeze in winter, and boats wait in the ports until "
    "spring comes back.",
]
EVIDENCE = "The old lighthouse of Varnholm was built in the year 1862."


def test_split_tiles_text_and_respects_abbreviations_and_headings():
    t = ("Mr. Smith met Dr. Jones at 3.14 p.m. today. They spoke, e.g. about os.path.join! Was it late? Yes...\n\n"
         "Heading\n=======\nBody text here. J. R. Smith agreed.")
    s = C.split_sentences(t)
    assert "".join(s) == t
    assert [x.strip() for x in s] == ["Mr. Smith met Dr. Jones at 3.14 p.m. today.",
                                      "They spoke, e.g. about os.path.join!", "Was it late?", "Yes...",
                                      "Heading\n=======", "Body text here.", "J. R. Smith agreed."]


def test_select_budget_threshold_and_title():
    scores = [[0.1, 0.9, 0.2], [0.8, 0.3]]
    lengths = [[2, 4, 4], [5, 5]]
    # keep 0.5 of 20 words: 0.9 (4), 0.8 (5), 0.3 (5) -> 14 >= 10 after the third? no: 4 + 5 = 9 < 10, + 0.3 -> 14
    assert select(scores, lengths, keep=0.5) == [[False, True, False], [True, True]]
    assert select(scores, lengths, threshold=0.25) == [[False, True, False], [True, True]]
    # title: a passage's first sentence comes with its first kept sentence and never alone
    assert select(scores, lengths, keep=0.3, title=True) == [[True, True, False], [False, False]]
    assert select([[0.9, 0.1]], [[3, 3]], threshold=0.5, title=True) == [[False, False]]
    assert select([[0.9]], [[3]], threshold=0.5, title=True) == [[True]]  # a one-sentence passage is no title


@pytest.mark.parametrize("method", ["bm25", "first-k", "random", "keep-all"])
def test_keep_one_returns_passages_unchanged(method):
    out = C.prune(Q, PASSAGES, method=method, **({} if method == "keep-all" else {"keep": 1.0}))
    assert out.passages == PASSAGES and out.kept_fraction == 1.0
    assert [len(s) for s in out.scores] == [len(C.split_sentences(p)) for p in PASSAGES]


@pytest.mark.parametrize("method", ["bm25", "first-k", "random"])
@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_kept_fraction_meets_the_rate_within_one_sentence(method, keep):
    out = C.prune(Q, PASSAGES, method=method, keep=keep, seed=3)
    sents = [C.split_sentences(p) for p in PASSAGES]
    total = sum(len(s.split()) for p in sents for s in p)
    kept = [len(s.split()) for p, m in zip(sents, out.kept) for s, k in zip(p, m) if k]
    assert sum(kept) / total == pytest.approx(out.kept_fraction)
    assert out.kept_fraction >= keep - 1e-9
    # without the last sentence added (the lowest score kept; ties: the later one) it would fall short
    last = max(((-out.scores[pi][si], pi, si) for pi, m in enumerate(out.kept) for si, k in enumerate(m) if k))
    assert (sum(kept) - len(sents[last[1]][last[2]].split())) / total < keep
    for p, m, pruned in zip(sents, out.kept, out.passages):
        assert pruned == " ".join(s.strip() for s, k in zip(p, m) if k) or (all(m) and pruned in PASSAGES)


def test_random_is_seeded_and_differs_by_seed():
    a = C.prune(Q, PASSAGES, method="random", keep=0.5, seed=1).kept
    assert C.prune(Q, PASSAGES, method="random", keep=0.5, seed=1).kept == a
    assert any(C.prune(Q, PASSAGES, method="random", keep=0.5, seed=s).kept != a for s in range(2, 6))


def test_bm25_keeps_the_planted_evidence_and_ranks_its_passage_first():
    out = C.prune(Q, PASSAGES, method="bm25", keep=0.2)
    assert EVIDENCE in out.passages[0]
    assert out.rerank[0] == max(out.rerank)


def test_bm25_matches_a_hand_computation():
    from prunekit.context.methods import bm25

    docs = [["a", "b"], ["b", "c", "c"]]
    import math

    idf = lambda df: math.log(1 + (2 - df + 0.5) / (df + 0.5))  # noqa: E731
    avg = 2.5
    want = [idf(2) * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / avg)),
            idf(2) * 1 * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 3 / avg)) + idf(1) * 2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 3 / avg))]
    assert bm25(["b", "c"], docs) == pytest.approx(want)


def test_provence_minilm_keeps_the_planted_evidence():
    out = C.prune(Q, PASSAGES, method="provence", keep=0.3)
    assert EVIDENCE in out.passages[0]
    assert out.passages[0].startswith("Harbors of the north.")  # the title comes with it
    assert out.rerank.index(max(out.rerank)) == 0
    thr = C.prune(Q, PASSAGES, method="provence")  # default threshold 0.1 on cosine
    assert EVIDENCE in thr.passages[0]


# --- LLMLingua against a direct computation ----------------------------------------------------------------


def direct_llmlingua(model, tok, question, passages, keep, segment, contrastive):
    """The same selection without a cache: every segment read in one full forward after the kept prefix."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in passages]
    counts = L.passage_counts([len(x) for x in ids], keep, list(range(len(ids))), 0.0)
    start = L.start_ids(tok)
    qids = tok("Question: " + question + "\n\n", add_special_tokens=False)["input_ids"]
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    kept_prefix, masks = [], []

    def losses(prefix, seg):
        seq = prefix + seg
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
        return torch.nn.functional.cross_entropy(logits[len(prefix) - 1:len(seq) - 1], torch.tensor(seg), reduction="none")

    for pi, x in enumerate(ids):
        if pi:
            kept_prefix += sep
        m = torch.zeros(len(x), dtype=torch.bool)
        for a, b, c in L.segment_counts(len(x), counts[pi], segment):
            imp = losses(start + kept_prefix, x[a:b])
            if contrastive:
                imp = imp - losses(start + qids + kept_prefix, x[a:b])
            m[a:b] = keep_highest(imp, c)
            kept_prefix += [t for t, k in zip(x[a:b], m[a:b].tolist()) if k]
        masks.append(m)
    return masks


@pytest.mark.parametrize("contrastive", [False, True])
def test_llmlingua_kept_tokens_equal_a_direct_computation(contrastive):
    model, tok = tiny_model("llama"), byte_tokenizer()
    passages = ["The lighthouse was built in 1862.", "Bread needs flour, water and salt; bake it well."]
    ids, imp, kept, order = L.compress(model, tok, "When was it built?", passages, 0.5, segment=16,
                                       contrastive=contrastive)
    want = direct_llmlingua(model, tok, "When was it built?", passages, 0.5, 16, contrastive)
    assert [k.tolist() for k in kept] == [w.tolist() for w in want]
    assert sum(int(k.sum()) for k in kept) == round(0.5 * sum(len(x) for x in ids))
    assert order == [0, 1]


def test_llmlingua_method_rates_and_keep_one():
    model, tok = tiny_model("llama"), byte_tokenizer()
    for keep in (0.3, 0.7):
        out = C.Pruner(method="llmlingua", keep=keep, segment=20, lm=(model, tok))(Q, PASSAGES)
        n = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in PASSAGES)
        assert out.kept_fraction == pytest.approx(round(keep * n) / n)
        assert [len(s) for s in out.scores] == [len(C.split_sentences(p)) for p in PASSAGES]
    assert C.Pruner(method="llmlingua", keep=1.0, lm=(model, tok))(Q, PASSAGES).passages == PASSAGES


def test_longllmlingua_reorders_by_question_likelihood_and_shares_dynamically():
    model, tok = tiny_model("llama"), byte_tokenizer()
    ll = L.question_likelihood(model, tok, Q, PASSAGES)
    out = C.Pruner(method="longllmlingua", keep=0.5, segment=30, lm=(model, tok))(Q, PASSAGES)
    assert out.order == sorted(range(3), key=lambda i: -ll[i])
    counts = L.passage_counts([100, 100, 100], 0.5, [2, 0, 1], 0.3)
    assert sum(counts) == 150 and counts[2] > counts[0] > counts[1]  # rank: best first; the best keeps most


def test_passage_and_segment_counts_add_up():
    assert sum(L.passage_counts([7, 13, 5], 0.37, [0, 1, 2], 0.0)) == round(0.37 * 25)
    segs = L.segment_counts(450, 200, 200)
    assert [(a, b) for a, b, _ in segs] == [(0, 200), (200, 400), (400, 450)] and sum(c for *_, c in segs) == 200


# --- scorers --------------------------------------------------------------------------------------------------


def tiny_bert_dir(tmp_path, classifier=False):
    import transformers as T

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,?") + \
        ["the", "old", "lighthouse", "was", "built", "in", "year", "bread", "water", "harbor"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words))
    tok = T.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=1)
    model = (T.BertForSequenceClassification if classifier else T.BertModel)(cfg).eval()
    d = tmp_path / ("xenc" if classifier else "enc")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


def test_cross_scorer_scores_sentences_and_round_trips(tmp_path):
    import prunekit
    from prunekit.context.scorers import CrossHead, CrossScorer

    d, enc, tok = tiny_bert_dir(tmp_path)
    head = CrossHead(enc)
    sc = CrossScorer(head, tok, max_length=48)  # windows smaller than a passage: chunks of whole sentences
    sents = [C.split_sentences(p) for p in PASSAGES]
    scores, rerank = sc.score(Q, sents)
    assert [len(s) for s in scores] == [len(p) for p in sents] and all(0 < x < 1 for p in scores for x in p)
    out = tmp_path / "scorer"
    out.mkdir()
    sc.save(out, {"epochs": 1}, {}, {})
    run = prunekit.load(out)
    assert run.kind == "context-scorer"
    s2, r2 = run.model.score(Q, sents)
    flat = lambda x: [v for p in x for v in p]  # noqa: E731
    assert flat(s2) == pytest.approx(flat(scores), abs=1e-5) and r2 == pytest.approx(rerank, abs=1e-5)
    res = C.prune(Q, PASSAGES, method="provence", scorer=str(out), keep=0.5)
    assert res.kept_fraction >= 0.5 and res.rerank == pytest.approx(rerank, abs=1e-5)


def test_encode_pair_chunks_whole_sentences(tmp_path):
    from prunekit.context.scorers import encode_pair

    _, _, tok = tiny_bert_dir(tmp_path)
    sents = ["the old lighthouse was built.", "bread and water.", "in the year 1862."] * 3
    chunks = encode_pair(tok, "was it built?", sents, max_length=40)
    assert len(chunks) > 1
    seen = []
    for ids, types, which in chunks:
        assert len(ids) <= 40 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        s = [w for w in which if w >= 0]
        seen += sorted(set(s))
    assert seen == list(range(len(sents)))  # every sentence in exactly one window, in order


def test_hf_cross_encoder_and_remote_code_refusal(tmp_path):
    d, model, tok = tiny_bert_dir(tmp_path, classifier=True)
    out = C.prune(Q, PASSAGES, method="provence", scorer=str(d), keep=0.5)
    with torch.no_grad():
        enc = tok([Q], [C.split_sentences(PASSAGES[0])[1].strip()], return_tensors="pt")
        want = float(torch.sigmoid(model(**enc).logits[0, 0]))
    assert out.scores[0][1] == pytest.approx(want, abs=1e-5)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling.Provence"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PruneError, match="trust-remote-code"):
        C.prune(Q, PASSAGES, method="provence", scorer=str(d), keep=0.5)


# --- the reader and the question sets ----------------------------------------------------------------------


def test_batched_answer_loglik_equals_one_by_one():
    from prunekit.context.reader import Reader, answer_loglik

    r = Reader(tiny_model("llama"), byte_tokenizer())
    items = [(Q, PASSAGES[:1], "1862", "It was built in the year"), (Q, [], "1862", "It was built in"),
             (Q, PASSAGES, "a year", "")]
    got = answer_loglik(r, items, batch_size=3)
    for (q, ps, g, pre), v in zip(items, got):
        assert v == pytest.approx(r.read(q, ps, g, None, pre).loglik, abs=1e-3)


def test_listwise_loss_is_a_softmax_over_the_questions_sentences():
    from prunekit.context.train import listwise_loss

    # one question, two passages (3 + 2 sentences), one window each; sentence 1 of passage 1 is relevant
    which = torch.tensor([[-1, 0, 0, 1, 2, -1], [-1, 0, 1, 1, -1, -1]])
    lab = [[False, False, False], [False, True]]
    batch = [([(None, None, None, None, 0), (None, None, None, None, 1)], lab)]
    keep = torch.randn(2, 6)
    sent = torch.stack([keep[0, 1:3].mean(), keep[0, 3], keep[0, 4], keep[1, 1], keep[1, 2:4].mean()])
    want = -torch.log_softmax(sent, 0)[4]
    assert float(listwise_loss(keep, which, batch)) == pytest.approx(float(want), abs=1e-5)
    up = keep.clone()
    up[1, 2:4] += 5.0  # the relevant sentence's tokens score higher: the loss falls
    assert listwise_loss(up, which, batch) < listwise_loss(keep, which, batch)
    # a question with no relevant sentence adds nothing
    assert listwise_loss(keep, which, [(batch[0][0], [[False] * 3, [False] * 2])]) is None


def test_silver_gains_are_cached_and_thresholded(tmp_path, monkeypatch):
    from prunekit.context import qa
    from prunekit.context.reader import Reader
    from prunekit.context.train import labels_from_gains, silver_gains

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    items = qa.build("train", 1, 1)
    r = Reader(tiny_model("llama"), byte_tokenizer())
    g = silver_gains(items, r, seed=0, progress=False)
    assert len(g) == 2 and all(len(x["cands"]) == len(x["gains"]) > 0 for x in g)
    assert list(tmp_path.glob("context/silver/*.json"))

    def broken(*a, **k):  # a second call must not read the LM again
        raise AssertionError("the cached gains were recomputed")

    monkeypatch.setattr(r, "prompt_ids", broken)
    assert silver_gains(items, r, seed=0, progress=False) == g
    fake = [{"cands": [[0, 0], [1, 0], [1, 1]], "gains": [0.5, 3.0, 2.5]}]
    item = qa.Item("q", ["Alpha one. Beta two.", "Gamma three. Delta four. Omega five."], "x", 1,
                   "Gamma three.", "needle")
    # margin 2 and at least half the best gain (1.5): sentences (1, 0) and (1, 1)
    assert labels_from_gains([item], fake, 2.0) == [[[False, False], [True, True, False]]]
    assert labels_from_gains([item], fake, 2.8) == [[[False, False], [True, False, False]]]


def test_question_parts_are_disjoint_and_deterministic():
    from prunekit.context import qa

    a, b = qa.build("test", 6, 6), qa.build("test", 6, 6)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    train = qa.build("train", 6, 6)
    test_t = {t[0] for t in qa.TEMPLATES["test"]}
    assert not test_t & {t[0] for t in qa.TEMPLATES["train"]}
    for it in a:
        assert it.answer in it.passages[it.gold] and qa.evidence_kept(it, it.passages)
        assert it.evidence in it.passages[it.gold] or it.task == "pydoc"
        assert it.prefix and it.answer not in it.prefix
    train_text = " ".join(p for it in train for p in it.passages)
    assert not any(it.evidence in train_text for it in a)


def test_prefix_match_and_normalize():
    from prunekit.context.qa import normalize, prefix_match

    assert normalize("The  Chapel!") == "chapel"
    assert prefix_match("the bell tower, at noon", "bell tower") and not prefix_match("a riddle.", "pepper")


# --- the CLI -----------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_prune_round_trip(tmp_path):
    inp = write_jsonl(tmp_path / "q.jsonl", [{"question": Q, "passages": PASSAGES, "id": 7}] * 2)
    out = tmp_path / "p.jsonl"
    rc, so, se = invoke("context", "prune", "--input", inp, "--method", "bm25", "--keep", "0.4", "--out", out, "--quiet")
    assert rc == 0, se
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["id"] == 7 and len(rows[0]["passages"]) == 3
    assert rows[0]["kept_fraction"] >= 0.4 and EVIDENCE in rows[0]["passages"][0]
    assert [len(s) for s in rows[0]["scores"]] == [len(C.split_sentences(p)) for p in PASSAGES]
    rc, _, se = invoke("context", "prune", "--input", inp, "--method", "bm25", "--keep", "0.4", "--out", out, "--quiet")
    assert rc == 2 and "already exists" in error_line(se)
    rc, _, se = invoke("context", "prune", "--input", inp, "--method", "bm25", "--keep", "0.4", "--out", out,
                       "--overwrite", "--quiet")
    assert rc == 0, se


@pytest.mark.parametrize("rows,args,msg", [
    ([{"question": "", "passages": ["a b."]}], ["--keep", "0.5"], "line 1: the question is empty"),
    ([{"question": "q?", "passages": ["a b.", "  "]}], ["--keep", "0.5"], "line 1: passage 2 is empty"),
    ([{"question": "q?", "passages": ["\x00\x01\x02 binary"]}], ["--keep", "0.5"], "not text"),
    ([{"question": "q?", "passages": ["a b."]}], ["--keep", "1.5"], "keep must be in (0, 1]"),
    ([{"question": "q?", "passages": ["a b."]}], ["--keep", "0"], "keep must be in (0, 1]"),
    ([{"question": "q?", "passages": ["a b."]}], ["--keep", "0.5", "--threshold", "0.2"], "not both"),
    ([{"question": "q?", "passages": ["a b."]}], ["--method", "frobnicate", "--keep", "0.5"], "choose one of"),
])
def test_cli_refusals(tmp_path, rows, args, msg):
    inp = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "p.jsonl"
    rc, _, se = invoke("context", "prune", "--input", inp, "--out", out, *(["--method", "bm25"] if "--method" not in args else []), *args)
    assert rc == 2 and msg in error_line(se).lower()
    assert not out.exists()


def test_cli_malformed_line_names_its_number_and_writes_nothing(tmp_path):
    inp = tmp_path / "q.jsonl"
    inp.write_text(json.dumps({"question": "q?", "passages": ["a b."]}) + "\n" + "{not json\n")
    out = tmp_path / "p.jsonl"
    rc, _, se = invoke("context", "prune", "--input", inp, "--method", "bm25", "--keep", "0.5", "--out", out)
    assert rc == 2 and "line 2 is not valid json" in error_line(se).lower()
    assert not out.exists() and not list(tmp_path.glob(".p.jsonl*"))
    inp.write_bytes(b'{"question": "q?", "passages": ["\xff\xfe"]}\n')
    rc, _, se = invoke("context", "prune", "--input", inp, "--method", "bm25", "--keep", "0.5", "--out", out)
    assert rc == 2 and "line 1 is not utf-8" in error_line(se).lower()


def test_cli_bench_refusals():
    rc, _, se = invoke("context", "bench", "--rates", "0.5,1.4")
    assert rc == 2 and "outside (0, 1]" in error_line(se)
    rc, _, se = invoke("context", "bench", "--method", "nope")
    assert rc == 2 and "choose one of" in error_line(se)


# --- the real models (slow) ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_then_prune_with_the_trained_scorer(tmp_path):
    import prunekit

    out = tmp_path / "scorer"
    rc, so, se = invoke("context", "train", "--out", out, "--needle", "2", "--pydoc", "2", "--epochs", "1", "--quiet")
    assert rc == 0, se
    assert "trained on 4 questions" in so
    run = prunekit.load(out)
    assert run.kind == "context-scorer" and run.manifest["recipe"]["needle"] == 2
    inp = write_jsonl(tmp_path / "q.jsonl", [{"question": Q, "passages": PASSAGES}])
    res = tmp_path / "p.jsonl"
    rc, _, se = invoke("context", "prune", "--input", inp, "--method", "provence", "--scorer", out, "--keep", "0.5",
                       "--out", res, "--quiet")
    assert rc == 0, se
    row = json.loads(res.read_text())
    assert row["kept_fraction"] >= 0.5 and len(row["rerank"]) == 3
    rc, _, se = invoke("context", "train", "--out", out, "--quiet")
    assert rc == 2 and "already exists" in error_line(se)


@pytest.mark.slow
def test_cli_bench_reads_with_smollm2(tmp_path):
    out = tmp_path / "bench.json"
    rc, so, se = invoke("context", "bench", "--method", "bm25", "--rates", "0.5", "--needle", "2", "--pydoc", "0",
                        "--out", out, "--quiet")
    assert rc == 0, se
    rows = json.loads(out.read_text())["metrics"]["rows"]
    assert [r["method"] for r in rows] == ["keep-all", "bm25 keep=0.5"]
    assert rows[1]["kept"] < 0.75 and rows[0]["evidence"] == 1.0 and "| bm25 keep=0.5 |" in so


@pytest.mark.slow
def test_longllmlingua_reads_the_answering_passage_first_with_smollm2():
    # token pruning does not promise to keep the planted answer (benchmarks/context.py: it often drops it);
    # its coarse stage must still rank the passage that answers first
    out = C.prune(Q, PASSAGES, method="longllmlingua", keep=0.5)
    assert out.order[0] == 0, out.order
    assert abs(out.kept_fraction - 0.5) < 0.01
