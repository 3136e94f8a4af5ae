"""Architecture adapters: the only place that knows where a model keeps its blocks and what it names them."""

from prunekit.arch.base import Adapter, Layout, adapter_for, target_layers, untargeted_weights

__all__ = ["Adapter", "Layout", "adapter_for", "target_layers", "untargeted_weights"]
