"""Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...): blocks in ``model.layers``."""

from prunekit.arch.base import Adapter, register

LLAMA = register(
    ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "granite", "smollm3"),
    Adapter(family="llama", blocks_path="model.layers"),
)
