"""OPT: blocks in ``model.decoder.layers``."""

from prunekit.arch.base import Adapter, register

OPT = register(("opt",), Adapter(family="opt", blocks_path="model.decoder.layers"))
