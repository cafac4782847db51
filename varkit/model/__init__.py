"""The AR transformer shared by every prediction unit, its KV cache and checkpoint import."""

from __future__ import annotations

from varkit.model.kv_cache import KVCache
from varkit.model.transformer import ARModel, ModelConfig

__all__ = ["ARModel", "KVCache", "ModelConfig"]
