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
  ``[B, S, head_dim]`` (position ids ``[3, B, S]`` for M-RoPE, ``[B, S]`` for 1D), entries ``f``
  and ``f + head_dim/2`` holding the same frequency, and the ``rotate_half`` convention (halves,
  not interleaved pairs; :func:`rotary_pairs`, :func:`rotate_at_frequencies`).
* **Hybrid decoders** (Qwen3.5). ``text_config.layer_types`` lists ``"linear_attention"`` (a Gated
  DeltaNet token mixer ``layer.linear_attn``: no KV cache, a causal-conv state and a recurrent
  state) and ``"full_attention"`` (``layer.self_attn``). Each layer kind gets its own mask: the
  causal mask above for attention layers, ``masking_utils.create_recurrent_attention_mask`` (the
  2D padding mask of the new tokens, None for a single token or no padding) for linear layers;
  a linear layer zeroes the hidden states of padding rows, so left padding leaves its state
  untouched. The cache entry of a linear layer is a ``LinearAttentionLayer`` with
  ``conv_states[0]`` [B, conv_dim, kernel] and ``recurrent_states[0]`` [B, v_heads, d_k, d_v]
  (dicts of state index -> tensor), updated in place, and no ``get_seq_length``; the cache's own
  ``get_seq_length()`` reads the first attention layer. A linear layer given one token with a
  filled state takes the recurrent (decode) path, several tokens the chunked scan from the state.
  The mixer's cache argument is ``cache_params`` in 5.17 and ``cache`` in 5.24 (read off its
  signature, like the layers' cache argument).
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
            (from :func:`causal_mask`), a ``{layer kind: mask}`` dict for hybrid decoders, or None.
        rope: ``(cos, sin)`` [B, S, head_dim].
        text_pos: [B, S] text positions (Qwen's packed-sequence row), or None.
        cache: a DynamicCache the layer appends its keys/values to, or None.
        kwargs: further keyword arguments the model's own forward passes to its layers.

    Returns:
        [B, S, H] the layer's output.
    """
    if isinstance(mask, dict):
        mask = mask[layer_kind(layer)]
    out = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=text_pos,
                use_cache=use_cache, **cache_kwargs(layer, cache), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def causal_mask(config, hidden: torch.Tensor, mask2d: torch.Tensor | None):
    """The attention mask HF's attention implementations expect for a prefill over ``hidden``
    [B, S, H] from an empty cache, with padding mask ``mask2d`` [B, S] (or None).

    For a hybrid decoder (:func:`has_linear_layers`) a dict ``{layer kind: mask}`` that
    :func:`call_layer` resolves per layer (linear layers get the 2D padding mask or None)."""
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask2d, position_ids=None,
                              **cache_kwargs(create_causal_mask, None))
    if not has_linear_layers(config):
        return mask
    return {FULL: mask, LINEAR: recurrent_mask(config, hidden, mask2d)}


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
    """``x`` [B, heads, S, d] rotated by tables [B, S, r] (r <= d: partial rotary, as Qwen3.5's
    attention layers use it, rotates the first r channels and passes the rest)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos[:, None] + rotate_half(x) * sin[:, None]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos[:, None] + rotate_half(rot) * sin[:, None], rest], -1)


def rotary_pairs(rows: torch.Tensor) -> torch.Tensor:
    """The output rows of a q or k projection that rotary turns together, as complex numbers.

    Under the ``rotate_half`` convention dims ``f`` and ``f + d/2`` of a head rotate as one complex
    number ``x_f + i x_{f+d/2}`` at frequency ``f``.

    Args:
        rows: [..., d, in] one head's ``d`` weight rows (real).

    Returns:
        [..., d/2, in] complex: row f is ``rows[f] + i rows[f + d/2]``.
    """
    half = rows.shape[-2] // 2
    return torch.complex(rows[..., :half, :], rows[..., half:, :])


def rotate_at_frequencies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Rotary in a rank space whose components turn at chosen frequencies of the head's rotary.

    Args:
        x: [B, S, G, r]: in group g, dims ``j`` and ``r/2 + j`` are the real and imaginary part of
            a component turning at frequency ``freq[g, j]``.
        cos, sin: [B, S, head_dim] the layer's rotary tables (entry f < head_dim/2 is frequency f,
            on whichever M-RoPE axis the model assigns it).
        freq: [G, r/2] int64 frequencies (< head_dim / 2).

    Returns:
        [B, S, G, r]: each component multiplied by ``e^{i w_f p}``, as HF's ``apply_rotary``
        turns dims (f, f + d/2) of a head.
    """
    c, s = cos[..., freq], sin[..., freq]  # [B, S, G, r/2]
    half = x.shape[-1] // 2
    re, im = x[..., :half], x[..., half:]
    return torch.cat([re * c - im * s, im * c + re * s], -1)


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
    """Tokens decoder layer ``layer`` has cached (0 for a layer that has cached nothing yet, and
    for a linear-attention layer, which caches no tokens)."""
    if cache is None or len(cache.layers) <= layer or is_linear_cache_layer(cache, layer):
        return 0
    return int(cache.layers[layer].get_seq_length())


def cache_length(cache) -> int:
    """Tokens the cache holds as HF counts them: the first attention layer's length (0 for None or
    an empty cache). Decoding on a pruned cache uses it to tell a prefill from a decode step."""
    if cache is None:
        return 0
    for i in range(len(cache.layers)):
        if not is_linear_cache_layer(cache, i):
            return layer_length(cache, i)
    return 0


def cache_update(cache, keys: torch.Tensor, values: torch.Tensor, layer: int):
    """Append keys/values [B, kv_heads, T, d] to layer ``layer``; returns everything cached there."""
    return cache.update(keys, values, layer)


# -- hybrid decoders: linear-attention layers ------------------------------------------------

#: layer kinds of ``config.layer_types``
LINEAR, FULL = "linear_attention", "full_attention"


def layer_types(config) -> list[str]:
    """Kind of each decoder layer of a language-model ``config``: ``"full_attention"`` or
    ``"linear_attention"`` (a model without ``layer_types`` is all attention)."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL] * config.num_hidden_layers


def has_linear_layers(config) -> bool:
    """Whether the decoder interleaves linear-attention layers with attention layers."""
    return LINEAR in layer_types(config)


def attention_layers(config) -> list[int]:
    """Indices of the decoder layers that attend over a KV cache (not linear attention)."""
    return [i for i, t in enumerate(layer_types(config)) if t != LINEAR]


def layer_kind(layer: torch.nn.Module) -> str:
    """``"linear_attention"`` for a decoder layer whose token mixer is linear attention, else
    ``"full_attention"``."""
    return LINEAR if hasattr(layer, "linear_attn") else FULL


def recurrent_mask(config, hidden: torch.Tensor, mask2d: torch.Tensor | None):
    """The mask HF gives a linear-attention layer for the tokens ``hidden`` [B, q, H]: the last
    ``q`` columns of the 2D padding mask ``mask2d`` [B, >=q], or None (no padding, one token)."""
    from transformers.masking_utils import create_recurrent_attention_mask

    return create_recurrent_attention_mask(config, hidden, mask2d)


def call_linear_mixer(layer: torch.nn.Module, normed: torch.Tensor, *, mask, cache=None) -> torch.Tensor:
    """The token mixer of a linear-attention decoder layer alone (no residual, no MLP): ``normed``
    [B, S, H] (the layer's input after its input norm), ``mask`` from :func:`recurrent_mask`;
    appends to ``cache``'s states like the layer. Returns [B, S, H]. The cache argument
    (``cache_params`` in 5.17, ``cache`` in 5.24) is read off the mixer's signature."""
    mixer = layer.linear_attn
    params = inspect.signature(type(mixer).forward).parameters
    name = next(n for n in ("cache", "cache_params", "past_key_values") if n in params)
    return mixer(hidden_states=normed, attention_mask=mask, **{name: cache})


def is_linear_cache_layer(cache, layer: int) -> bool:
    """Whether cache entry ``layer`` holds linear-attention states (no keys/values)."""
    return layer < len(cache.layers) and hasattr(cache.layers[layer], "recurrent_states")


def _linear_state_slots(cache, layer: int) -> list[tuple[dict, int]]:
    if cache is None or not is_linear_cache_layer(cache, layer):
        return []
    entry = cache.layers[layer]
    return [(states, k) for states in (entry.conv_states, entry.recurrent_states) for k, t in states.items()
            if t is not None]


def linear_states(cache, layer: int) -> list[torch.Tensor]:
    """The state tensors a linear-attention layer has cached: its conv states [B, conv_dim,
    kernel] and recurrent states [B, v_heads, d_k, d_v] (empty before the layer has run)."""
    return [states[k] for states, k in _linear_state_slots(cache, layer)]


def linear_state_bytes(cache, layer: int) -> int:
    """Bytes one sample's states take in linear-attention layer ``layer`` (0 if none yet)."""
    return sum(t[0].numel() * t.element_size() for t in linear_states(cache, layer))


class preserved_linear_state:
    """Context manager: whatever runs inside leaves linear-attention layer ``layer``'s cached
    states as they were on entry (tokens scanned inside do not stay in the recurrence)."""

    def __init__(self, cache, layer: int):
        self.saved = [(states, k, states[k].clone()) for states, k in _linear_state_slots(cache, layer)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # In place where the layer kept the tensor (its states have static addresses for graphs).
        for states, k, saved in self.saved:
            if states[k].shape == saved.shape:
                states[k].copy_(saved)
            else:
                states[k] = saved
        return False


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
    "FULL", "LINEAR", "attention_layers", "cache_length", "has_linear_layers", "is_linear_cache_layer", "layer_kind", "call_linear_mixer",
    "layer_types", "linear_state_bytes", "linear_states", "preserved_linear_state", "recurrent_mask",
    "cache_kwargs", "cache_layers", "cache_update", "call_layer", "causal_mask", "get_cache", "in_supported_range",
    "is_dynamic_cache", "layer_kv", "layer_length", "lm_output", "model_from_config", "new_cache", "output_cache", "pop_cache", "pop_deepstack",
    "rope_deltas", "rotary", "rotary_pairs", "rotate_at_frequencies", "rotate_half", "select_best_resolution",
    "set_attn_implementation", "set_layer_kv",
    "transformers_version", "warn_if_untested",
]
