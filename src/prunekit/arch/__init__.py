"""Architecture adapters: the only place that knows where a model keeps its blocks and what it names them."""

from prunekit.arch.base import Adapter, adapter_for, target_layers

__all__ = ["Adapter", "adapter_for", "target_layers"]
