"""Offline assets by name: models and texts that ship inside installed packages."""

from prunekit.zoo.models import MODELS, load_model
from prunekit.zoo.text import TEXTS, load_text

__all__ = ["MODELS", "TEXTS", "load_model", "load_text"]
