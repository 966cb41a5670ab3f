"""``model_type -> adapter`` registry: one module per model family, one line here per family.

Everything else in the package (patching, the CLI, benchmarks, training, calibration, the cost
model, the tiny models and the tests) finds a family through this registry.
"""

from __future__ import annotations

from .base import ModelAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    Qwen2_5_VLAdapter.model_type: Qwen2_5_VLAdapter,
    LlavaAdapter.model_type: LlavaAdapter,
    LlavaNextAdapter.model_type: LlavaNextAdapter,
    InternVLAdapter.model_type: InternVLAdapter,
    LlavaOnevisionAdapter.model_type: LlavaOnevisionAdapter,
    Qwen2VLAdapter.model_type: Qwen2VLAdapter,
    Qwen3VLAdapter.model_type: Qwen3VLAdapter,
    Qwen3VLMoeAdapter.model_type: Qwen3VLMoeAdapter,
}

#: the family the command line's tiny models and demos use when none is named
DEFAULT_MODEL = Qwen2_5_VLAdapter.model_type


def supported_models() -> list[str]:
    """The ``model_type`` of every supported family."""
    return sorted(ADAPTERS)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class of ``model_type``; a ValueError naming the supported ones otherwise."""
    if model_type not in ADAPTERS:
        raise ValueError(f"token_prune does not support model_type {model_type!r}; "
                         f"supported: {', '.join(supported_models())}")
    return ADAPTERS[model_type]


def adapter_for(model) -> ModelAdapter:
    """The adapter of ``model``'s ``config.model_type``; a ValueError naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"token_prune does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(supported_models())}"
        )
    cls = ADAPTERS[model_type]
    import transformers

    expected = getattr(transformers, cls.hf_model_class, None)
    if expected is not None and not isinstance(model, expected):
        raise ValueError(
            f"token_prune patches the whole {cls.hf_model_class} (the model with .generate), got "
            f"{type(model).__name__}; pass that model, not one of its parts")
    return cls(model)


__all__ = ["ADAPTERS", "DEFAULT_MODEL", "adapter_class", "adapter_for", "supported_models", "ModelAdapter"]
