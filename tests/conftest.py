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
