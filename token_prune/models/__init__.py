"""``model_type -> adapter`` registry. One small module per architecture."""

from __future__ import annotations

from .base import ModelAdapter, Runtime
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    Qwen2_5_VLAdapter.model_type: Qwen2_5_VLAdapter,
    LlavaAdapter.model_type: LlavaAdapter,
    LlavaNextAdapter.model_type: LlavaNextAdapter,
}


def supported_models() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model) -> ModelAdapter:
    """The adapter of ``model``'s ``config.model_type``; a ValueError naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"token_prune does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(supported_models())}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "adapter_for", "supported_models", "ModelAdapter", "Runtime"]
