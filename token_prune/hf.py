"""The one module that touches ``transformers`` internals.

Everything else in the package (methods, adapters, training, benchmarks, the accuracy harness and
the tests' oracle) reaches Hugging Face's private machinery through the functions here, so that a
new transformers release that renames or moves something is fixed in this file alone.

Internals relied on, with the releases each was checked against (5.17.0 and 5.24.0, the two ends
of :data:`SUPPORTED`; 5.18 to 5.23 behave as 5.17 in every point below):

* **Decoder-layer call.** ``layer(hidden, attention_mask=..., position_ids=..., position_embeddings=
  (cos, sin), <cache>=..., use_cache=..., **kwargs)`` returning the hidden states. The cache
  argument is ``past_key_values`` up to 5.23 and ``cache`` from 5.24 (the old name is accepted
  with a FutureWarning until 5.40; given both, a layer uses ``cache``). The same rename applies
  to the language model's and the multimodal model's ``forward``, to ``generate``'s model
  kwargs and to the output classes' field. :func:`cache_arg` reads the name off each callable's
  signature, so no version number is compared.
* **Cache layout.** ``DynamicCache.layers[i].keys / .values``: ``[batch, kv_heads, tokens,
  head_dim]``, one object per layer (layers may hold different lengths), ``get_seq_length()``
  per layer and for the whole cache (layer 0), ``update(k, v, layer_idx)``.
* **Masks.** ``masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, <cache>,
  position_ids)`` (the cache argument renamed as above); it returns what the configured
  attention implementation expects (None for SDPA's causal fast path).
* **Attention registry.** ``modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]`` and each model
  module's ``eager_attention_forward(module, q, k, v, mask, dropout=, scaling=)``;
  ``config._attn_implementation``.
* **Outputs.** ``modeling_outputs.BaseModelOutputWithPast`` (cache field ``past_key_values`` up
  to 5.23, ``cache`` from 5.24).
* **Rotary.** ``language_model.rotary_emb(hidden, position_ids)`` returning ``(cos, sin)``
  ``[B, S, head_dim]`` (position ids ``[3, B, S]`` for M-RoPE, ``[B, S]`` for 1D), and the
  ``rotate_half`` convention (halves, not interleaved pairs).
* **Model construction.** ``PreTrainedModel._from_config(config, attn_implementation=, dtype=,
  experts_implementation=)``.
* **Deepstack.** Qwen3-VL's language model takes ``visual_pos_masks`` ([B, S] bool) and
  ``deepstack_visual_embeds`` (one [N_visual, H] tensor per early decoder layer, rows in
  row-major order of the mask) as forward arguments and, after decoder layer i for i below
  their count, adds row j to the hidden state of the j-th visual position
  (``_deepstack_process``); :func:`pop_deepstack` takes them off a call.
* **Helpers.** ``image_processing_utils.select_best_resolution`` (LLaVA-NeXT tiling) and the
  multimodal model's cached ``rope_deltas`` (Qwen M-RoPE decode positions).

To try a newer release: ``TOKEN_PRUNE_TRANSFORMERS=5.25.0 bash scripts/test.sh``; fix what
fails here; then raise the upper bound in ``pyproject.toml`` and :data:`SUPPORTED`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings

import torch

#: The transformers releases the package is tested on: ``(lowest, first untested)``. Must equal
#: the ``transformers`` requirement in ``pyproject.toml`` (a test checks it).
SUPPORTED = ("5.17", "5.25")

#: Names a cache argument has had, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not p.isdigit():  # 5.25.0rc1, 5.25.0.dev0: a pre-release of that version
            break
    return tuple(parts)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def in_supported_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in :data:`SUPPORTED`."""
    v = _version_tuple(version or transformers_version())[:2]
    return _version_tuple(SUPPORTED[0]) <= v < _version_tuple(SUPPORTED[1])


_warned_version = [False]


def warn_if_untested() -> None:
    """One warning per process when the installed transformers lies outside :data:`SUPPORTED`."""
    if _warned_version[0] or in_supported_range():
        return
    _warned_version[0] = True
    warnings.warn(
        f"token_prune is tested with transformers>={SUPPORTED[0]},<{SUPPORTED[1]}, but {transformers_version()} "
        "is installed; pruning may break or give wrong results. Check with "
        f"`TOKEN_PRUNE_TRANSFORMERS={transformers_version()} bash scripts/test.sh`.",
        RuntimeWarning,
        stacklevel=3,
    )


# -- argument names ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cache_arg_of(fn) -> str:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_NAMES:
        if name in params:
            return name
    # No explicit parameter (a **kwargs forward): the name transformers itself now passes.
    return _library_cache_name()


@functools.lru_cache(maxsize=None)
def _library_cache_name() -> str:
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(module_or_fn) -> str:
    """The name under which ``module_or_fn`` (a module: its class's ``forward``) takes its KV cache."""
    fn = type(module_or_fn).forward if isinstance(module_or_fn, torch.nn.Module) else module_or_fn
    fn = getattr(fn, "__func__", fn)
    return _cache_arg_of(fn)


def cache_kwargs(module_or_fn, cache) -> dict:
    """``{name: cache}`` for calling ``module_or_fn`` with a KV cache, under the name it expects."""
    return {cache_arg(module_or_fn): cache}


def pop_cache(kwargs: dict):
    """Remove and return the KV cache from a ``**kwargs`` dict, whichever name it came under."""
    found = None
    for name in CACHE_NAMES:
        if name in kwargs:
            value = kwargs.pop(name)
            if found is None:
                found = value
    return found


def get_cache(kwargs: dict):
    """The KV cache in a kwargs dict (either name), without removing it."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


# -- deepstack ---------------------------------------------------------------------------------

#: the language model's forward arguments carrying deepstack inputs: (visual mask, per-layer rows)
DEEPSTACK_ARGS = ("visual_pos_masks", "deepstack_visual_embeds")


def pop_deepstack(kwargs: dict) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """Remove and return a language-model call's deepstack inputs: (visual mask [B, S] bool,
    per early decoder layer [N_visual, H] rows), or (None, None) when the call has none."""
    mask, embeds = (kwargs.pop(name, None) for name in DEEPSTACK_ARGS)
    if embeds is None or len(embeds) == 0:
        return None, None
    return mask, list(embeds)


def add_deepstack(hidden: torch.Tensor, visual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What a deepstack language model does after an early decoder layer: ``hidden`` [B, S, H]
    plus ``rows`` [N, H] at the ``N`` positions ``visual`` [B, S] marks (row-major), as a new
    tensor (the sum in the model's dtype, like HF's)."""
    out = hidden.clone()
    out[visual] = hidden[visual] + rows.to(hidden.device, hidden.dtype)
    return out


# -- decoder layers --------------------------------------------------------------------------

def call_layer(layer: torch.nn.Module, hidden: torch.Tensor, *, mask, rope, text_pos=None, cache=None,
               use_cache=False, **kwargs) -> torch.Tensor:
    """Run one HF decoder layer.

    Args:
        layer: a decoder layer of a supported language model.
        hidden: [B, S, H] its input.
        mask: the attention mask in the form the model's attention implementation expects
            (from :func:`causal_mask`), or None.
        rope: ``(cos, sin)`` [B, S, head_dim].
        text_pos: [B, S] text positions (Qwen's packed-sequence row), or None.
        cache: a DynamicCache the layer appends its keys/values to, or None.
        kwargs: further keyword arguments the model's own forward passes to its layers.

    Returns:
        [B, S, H] the layer's output.
    """
    out = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=text_pos,
                use_cache=use_cache, **cache_kwargs(layer, cache), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def causal_mask(config, hidden: torch.Tensor, mask2d: torch.Tensor | None):
    """The attention mask HF's attention implementations expect for a prefill over ``hidden``
    [B, S, H] from an empty cache, with padding mask ``mask2d`` [B, S] (or None)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask2d, position_ids=None,
                              **cache_kwargs(create_causal_mask, None))


def attn_implementation(config) -> str:
    """The attention implementation a model was loaded with (``"sdpa"``, ``"eager"``, ...)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


def set_attn_implementation(config, impl: str) -> None:
    """Select the attention implementation on a config before building a model from it."""
    config._attn_implementation = impl


def attention_function(attn_module: torch.nn.Module, impl: str):
    """``fn(module, q, k, v, mask, dropout=, scaling=) -> (out [B, S, heads, d], weights)`` for
    ``impl``: the model's own eager function, or HF's registered SDPA function (which takes an
    arbitrary mask; flash kernels do not, so they map to SDPA too)."""
    if impl == "eager":
        return getattr(sys.modules[type(attn_module).__module__], "eager_attention_forward")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def rotary(lm: torch.nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """``(cos, sin)`` [B, S, head_dim] of the language model's rotary embedding at ``position_ids``
    ([3, B, S] for M-RoPE, [B, S] for 1D RoPE)."""
    return lm.rotary_emb(hidden, position_ids)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotary convention: ``x = [x1, x2]`` (halves) -> ``[-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [B, heads, S, d] rotated by tables [B, S, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# -- caches ----------------------------------------------------------------------------------

def new_cache(config):
    """An empty DynamicCache for a language model with ``config``."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)


def is_dynamic_cache(cache) -> bool:
    """True for the DynamicCache whose per-layer tensors pruning may replace (not static/quantised)."""
    from transformers.cache_utils import DynamicCache

    return type(cache) is DynamicCache


def cache_layers(cache) -> int:
    """Number of per-layer entries a cache holds."""
    return len(cache.layers)


def layer_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, kv_heads, T, d] cached by decoder layer ``layer``."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


def set_layer_kv(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace what decoder layer ``layer`` has cached (e.g. with a compacted copy)."""
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def layer_length(cache, layer: int = 0) -> int:
    """Tokens decoder layer ``layer`` has cached (0 for a layer that has cached nothing yet)."""
    if cache is None or len(cache.layers) <= layer:
        return 0
    return int(cache.layers[layer].get_seq_length())


def cache_update(cache, keys: torch.Tensor, values: torch.Tensor, layer: int):
    """Append keys/values [B, kv_heads, T, d] to layer ``layer``; returns everything cached there."""
    return cache.update(keys, values, layer)


# -- outputs ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _output_cache_field(cls) -> str:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for name in CACHE_NAMES:
        if name in names:
            return name
    return _library_cache_name()


def lm_output(last_hidden_state: torch.Tensor, cache):
    """The language model's output object (``BaseModelOutputWithPast``) carrying ``cache``."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state,
                                   **{_output_cache_field(BaseModelOutputWithPast): cache})


def output_cache(output):
    """The KV cache a model output carries (``out.cache`` or ``out.past_key_values``), or None."""
    return output.get(_output_cache_field(type(output)))


def model_from_config(cls, config, *, attn_implementation: str = "sdpa", dtype=None,
                      experts_implementation: str | None = None):
    """A random-weight model of class ``cls`` built from ``config`` (no download), with the given
    attention implementation and parameter dtype (and, for MoE decoders, experts implementation:
    ``"eager"`` loops over the experts in any dtype, the grouped kernels take no float64). Builds
    on the current default device."""
    set_attn_implementation(config, attn_implementation)
    kwargs = dict(attn_implementation=attn_implementation)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    return cls._from_config(config, **kwargs)


# -- model-family helpers -------------------------------------------------------------------

def select_best_resolution(image_size, grid_pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of the tiling resolution (height, width) for an image (height, width)."""
    from transformers.image_processing_utils import select_best_resolution as pick

    return pick(image_size, grid_pinpoints)


def rope_deltas(multimodal_model) -> torch.Tensor | None:
    """The per-sample M-RoPE offset [B, 1] a Qwen-VL model cached at its last prefill."""
    return getattr(multimodal_model, "rope_deltas", None)


__all__ = [
    "SUPPORTED", "CACHE_NAMES", "DEEPSTACK_ARGS", "add_deepstack", "apply_rotary", "attention_function", "attn_implementation", "cache_arg",
    "cache_kwargs", "cache_layers", "cache_update", "call_layer", "causal_mask", "get_cache", "in_supported_range",
    "is_dynamic_cache", "layer_kv", "layer_length", "lm_output", "model_from_config", "new_cache", "output_cache", "pop_cache", "pop_deepstack",
    "rope_deltas", "rotary", "rotate_half", "select_best_resolution", "set_attn_implementation", "set_layer_kv",
    "transformers_version", "warn_if_untested",
]
