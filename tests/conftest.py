"""Tiny random decoder models from configs (milliseconds, no files) and a byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

VOCAB = 256
FAMILIES = ("llama", "gpt2", "opt", "qwen2", "mistral")


def tiny_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2):
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "llama":  # grouped-query attention: 4 query heads, 2 kv heads
        cfg = t.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, **common)
        cls = t.LlamaForCausalLM
    elif family == "qwen2":
        cfg = t.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, **common)
        cls = t.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = t.MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)
        cls = t.MistralForCausalLM
    elif family == "gpt2":
        cfg = t.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
        cls = t.GPT2LMHeadModel
    elif family == "opt":
        cfg = t.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=256, word_embed_proj_dim=hidden, **common)
        cls = t.OPTForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg)
    # random init uses std 0.02: scale up so activations are not all tiny and methods differ visibly
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def byte_tokenizer():
    """A 256-token byte-level tokenizer built in memory (no files, no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=sorted(alphabet)[1])


# every family the calibration engine supports or claims to support (prunekit.arch registers each), with the
# convention it exercises; tests/test_engine_families.py runs the engine on each
ENGINE_FAMILIES = {
    "llama": "grouped-query attention",
    "llama-tied": "tied embeddings",
    "mistral-sliding": "sliding-window attention in every layer",
    "qwen2": "q/k/v biases",
    "qwen2-sliding": "sliding window above max_window_layers only (layers differ)",
    "qwen3": "QK-norm per head",
    "gemma": "embeddings scaled by sqrt(hidden), tied head",
    "gemma2": "alternating sliding/global layers, attention and final logit soft-capping, extra norms",
    "gemma3": "alternating layer types with their own rotary bases",
    "cohere2": "sliding/global layers, parallel attention + MLP, logit scale",
    "phi3": "fused qkv_proj and gate_up_proj",
    "phi": "parallel attention + MLP, partial rotary",
    "gpt_neox": "fused query_key_value, parallel residual",
    "falcon": "multi-query fused QKV, parallel attention + MLP, tuple-returning blocks",
    "gpt2": "Conv1D layers, learned positions",
    "gpt_bigcode": "multi-query fused c_attn",
    "opt": "learned positions, fc1/fc2",
    "olmo": "non-parametric layer norms",
    "olmo2": "QK-norm over all heads, norms after sublayers",
    "stablelm": "QK layer norm, parallel residual, partial rotary",
    "granite": "embedding/residual/logit multipliers",
    "smollm3": "layers without rotary embeddings (NoPE)",
    "mixtral": "mixture of experts (router + 3-D expert weights)",
}


def tiny_arch(family: str, seed: int = 0, hidden: int = 32, layers: int = 4):
    """A tiny random model of any of ``ENGINE_FAMILIES`` (4 layers, sliding windows of 8 where there are any)."""
    import transformers as t

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    dec = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, **common)
    mha = {k: v for k, v in dec.items() if k != "num_key_value_heads"}
    alt = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    if family in ("llama", "llama-tied"):
        cfg, cls = t.LlamaConfig(**dec, tie_word_embeddings=family == "llama-tied"), t.LlamaForCausalLM
    elif family == "mistral-sliding":
        cfg, cls = t.MistralConfig(**dec, sliding_window=8), t.MistralForCausalLM
    elif family == "qwen2":
        cfg, cls = t.Qwen2Config(**dec), t.Qwen2ForCausalLM
    elif family == "qwen2-sliding":
        cfg = t.Qwen2Config(**dec, use_sliding_window=True, sliding_window=8, max_window_layers=layers // 2)
        cls = t.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = t.Qwen3Config(**dec, head_dim=8), t.Qwen3ForCausalLM
    elif family == "gemma":
        cfg, cls = t.GemmaConfig(**dec, head_dim=8), t.GemmaForCausalLM
    elif family == "gemma2":
        cfg = t.Gemma2Config(**dec, head_dim=8, sliding_window=8, layer_types=alt, final_logit_softcapping=3.0,
                             attn_logit_softcapping=5.0)
        cls = t.Gemma2ForCausalLM
    elif family == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        cfg = t.Gemma3TextConfig(**dec, head_dim=8, sliding_window=8, layer_types=alt, rope_parameters=rope)
        cls = t.Gemma3ForCausalLM
    elif family == "cohere2":
        cfg, cls = t.Cohere2Config(**dec, head_dim=8, sliding_window=8, layer_types=alt), t.Cohere2ForCausalLM
    elif family == "phi3":
        cfg, cls = t.Phi3Config(**dec), t.Phi3ForCausalLM
    elif family == "phi":
        cfg, cls = t.PhiConfig(**mha), t.PhiForCausalLM
    elif family == "gpt_neox":
        cfg, cls = t.GPTNeoXConfig(**mha), t.GPTNeoXForCausalLM
    elif family == "falcon":
        cfg = t.FalconConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, **common)
        cls = t.FalconForCausalLM
    elif family == "gpt2":
        cfg, cls = t.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **common), t.GPT2LMHeadModel
    elif family == "gpt_bigcode":
        cfg = t.GPTBigCodeConfig(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, multi_query=True, **common)
        cls = t.GPTBigCodeForCausalLM
    elif family == "opt":
        cfg = t.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                          max_position_embeddings=128, word_embed_proj_dim=hidden, **common)
        cls = t.OPTForCausalLM
    elif family == "olmo":
        cfg, cls = t.OlmoConfig(**dec), t.OlmoForCausalLM
    elif family == "olmo2":
        cfg, cls = t.Olmo2Config(**dec), t.Olmo2ForCausalLM
    elif family == "stablelm":
        cfg, cls = t.StableLmConfig(**dec, qk_layernorm=True, use_parallel_residual=True), t.StableLmForCausalLM
    elif family == "granite":
        cfg = t.GraniteConfig(**dec, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0)
        cls = t.GraniteForCausalLM
    elif family == "smollm3":
        cfg, cls = t.SmolLM3Config(**dec, no_rope_layer_interval=2), t.SmolLM3ForCausalLM
    elif family == "mixtral":
        cfg, cls = t.MixtralConfig(**dec, num_local_experts=4, num_experts_per_tok=2), t.MixtralForCausalLM
    else:
        raise ValueError(family)
    return randomized(cls(cfg))


def randomized(model):
    """``model`` with every matrix drawn from N(0, 0.2) (a tiny random model whose layers all matter), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.eval()


def bos_tokenizer():
    """The byte-level tokenizer with a begin-of-sequence token that ``tokenizer(text)`` puts first (as Llama's)."""
    from tokenizers import processors

    tok = byte_tokenizer()
    bos = tok.convert_ids_to_tokens(0)
    tok.bos_token = bos
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return tok


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (small trainings are faster and deterministic that way)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (16, 32), generator=g)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory with its tokenizer, plus a text file to calibrate on."""
    model = tiny_model("llama")
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    text = tmp_path / "text.txt"
    import pydoc_data.topics as t

    text.write_text("\n".join(list(t.topics.values())[:40]))
    return d, text


def invoke(*args):
    """Run the CLI in this process: ``(exit code, stdout, stderr)``. An exception that is not a clean exit
    propagates (so a test sees the traceback a user would)."""
    import contextlib
    import io

    from prunekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return rc, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    """The one ``error:`` line a failed command printed (asserts there is exactly one, last, and no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]
