"""``token_prune.patch`` / ``unpatch`` and the handle they return."""

from __future__ import annotations

import torch

from . import hf
from .methods import method_class
from .models import adapter_for
from .runtime import Runtime

_ATTR = "_token_prune_handle"


class PatchHandle:
    """A method installed on one model instance.

    Use ``handle.remove()`` (or ``with token_prune.patch(...):``) to restore the model exactly.

    Attributes:
        method: the method object (its options are in ``handle.options``).
        stats: per-sample statistics of the last prefill, a list of dicts with
            ``prompt_len`` (real prompt tokens), ``visual_tokens``, ``kept_tokens``,
            ``keep_ratio``, ``images`` (per image ``tokens``/``kept``), ``kv_len`` (per decoder
            layer, the sample's KV cache length after prefill; 0 for a linear-attention layer),
            ``kv_len_padded`` (per layer, the padded cache length of the batch), ``kv_bytes`` (the
            sample's keys and values), and on a hybrid decoder ``recurrent_tokens`` (per layer,
            prompt tokens a linear-attention layer's state scanned) and ``recurrent_state_bytes``.
    """

    def __init__(self, model, runtime: Runtime):
        self._model = model
        self._runtime = runtime

    @property
    def model(self):
        return self._model

    @property
    def method(self):
        return self._runtime.method

    @property
    def options(self) -> dict:
        return self._runtime.method.options()

    @property
    def stats(self) -> list[dict]:
        return self._runtime.stats

    @property
    def keep_mask(self):
        """[B, S] bool over the last prefill's prompt: True where the token is still in the KV cache."""
        return self._runtime.keep_mask

    @property
    def active(self) -> bool:
        return self._model is not None

    def remove(self) -> None:
        """Undo the patch: every wrapper and hook goes; the model is as before. Idempotent."""
        if self._model is None:
            return
        self._runtime.remove()
        self._model.__dict__.pop(_ATTR, None)
        self._model = None

    def __enter__(self):
        return self

    def __deepcopy__(self, memo):
        # A deep copy of a patched model is unpatched (see token_prune/instance_patch.py): it has
        # no handle.
        return None

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"PatchHandle(method={self._runtime.method.name!r}, {state}, options={self.options})"


def patch(model, method: str = "glimpse", **options) -> PatchHandle:
    """Install a pruning method on ``model`` (this instance only).

    Args:
        model: a Hugging Face ``Qwen2_5_VLForConditionalGeneration``, ``LlavaForConditionalGeneration``
            (LLaVA-1.5) or ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT); also such a model
            wrapped by PEFT (a ``PeftModel``, e.g. LoRA on the language model): the patch then goes
            on the model inside, and the adapters stay active in every pruned forward.
        method: ``"glimpse"``.
        **options: the method's options (see :class:`token_prune.methods.glimpse.GlimpsePrune`).

    Returns:
        A :class:`PatchHandle`. ``model.generate`` and ``model(...)`` then prune as configured.

    Raises:
        ValueError / TypeError: unknown method, unsupported model, bad options, a VIP that does
        not fit the model, or a model that is already patched. The model is left unpatched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    model = hf_model(model)
    existing = model.__dict__.get(_ATTR)
    if existing is not None and existing.active:
        raise ValueError(
            f"this model is already patched with method {existing.method.name!r}; call handle.remove() "
            "or token_prune.unpatch(model) first"
        )
    cls = method_class(method)
    adapter = adapter_for(model)
    hf.warn_if_untested()
    runtime = Runtime(adapter, cls(adapter, **options))
    runtime.install()
    handle = PatchHandle(model, runtime)
    model.__dict__[_ATTR] = handle
    return handle


def hf_model(model):
    """The Hugging Face model a PEFT wrapper holds (``PeftModel.get_base_model()``), else ``model``.

    Checked by the wrapper's module so that peft need not be installed."""
    if type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def unpatch(model) -> bool:
    """Remove whatever ``token_prune`` installed on ``model``. Returns False when it was not patched."""
    handle = hf_model(model).__dict__.get(_ATTR)
    if handle is None:
        return False
    handle.remove()
    return True


def get_handle(model) -> PatchHandle | None:
    """The active handle of ``model`` (or of the model inside a PEFT wrapper), or None."""
    handle = hf_model(model).__dict__.get(_ATTR)
    return handle if handle is not None and handle.active else None
