"""GPT-2: blocks in ``transformer.h``; its linear layers are ``Conv1D`` (weights stored as [in, out])."""

from prunekit.arch.base import Adapter, register

GPT2 = register(("gpt2",), Adapter(family="gpt2", blocks_path="transformer.h"))
