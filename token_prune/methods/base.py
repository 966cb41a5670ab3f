"""What every pruning method shares: option checks, per-image sizes, and the skeleton of the
methods that prune once, after a decoder layer K.

A method is a class with a ``name``, keyword options validated in ``__init__``, ``options()``,
``vision_layers()`` (the ViT blocks whose features it reads; empty for most) and
``prefill(rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult``. Methods that prune once
derive from :class:`PruneAfterLayer` and only say how the visual tokens are scored (FastV: the
last prompt token's attention; random: uniform draws; GlimpsePrune: its VIP), kvpress-style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import hf, nvtx
from ..runtime import PrefillResult, TokenBatch, causal_mask, compact_batch, keep_mask_from_scores, run_layers, sample_stats


# -- option checks ---------------------------------------------------------------------------

def _scalar(value):
    """A Python number from a Python, NumPy or 0-d tensor scalar (bools stay bools)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def check_fraction(name: str, value, *, low_open: bool = True, allow_none: bool = True) -> float | None:
    """``value`` as a float in (0, 1] (``low_open``) or [0, 1]; None passes when ``allow_none``."""
    value = _scalar(value)
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok or math.isnan(value):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)


def check_int(name: str, value, low: int | None = None, high: int | None = None, what: str = "") -> int:
    """``value`` as an int in [low, high] (either bound optional); ``what`` describes the range."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            rule = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        else:
            rule = f"in [{low if low is not None else '-inf'}, {high}]"
        raise ValueError(f"{name} must be {rule}{what}, got {value!r}")
    return int(value)


def check_layer(name: str, value, num_layers: int) -> int:
    """A decoder layer index of a ``num_layers``-layer model."""
    return check_int(name, value, 0, num_layers - 1, f" for this {num_layers}-layer model")


# -- visual tokens -------------------------------------------------------------------------------

def image_sizes(visual: torch.Tensor, known: list[int] | None) -> list[int]:
    """Tokens of each visual item (an image, or a whole video) in batch order: the sizes the
    vision capture recorded when known, else one item per contiguous run of visual tokens.

    Args:
        visual: [B, S] bool, True at visual tokens.
        known: the per-image counts the vision capture recorded, or None.
    """
    if known is not None:
        return known
    out = []
    for row in visual.tolist():
        run = 0
        for v in row + [False]:
            if v:
                run += 1
            elif run:
                out.append(run)
                run = 0
    return out


def scatter_visual(keep: torch.Tensor, visual: torch.Tensor, keep_vis: torch.Tensor) -> None:
    """Write the per-visual-token decisions ``keep_vis`` [N] into ``keep`` [B, >=S] at the
    positions ``visual`` [B, S] marks, in row-major order (in place)."""
    keep[:, :visual.shape[1]].masked_scatter_(visual, keep_vis)


# -- the skeleton ------------------------------------------------------------------------------

class PruningMethod:
    """Base of every method. Subclasses set ``name`` and implement ``prefill``."""

    name: str = ""

    def __init__(self, adapter):
        self.adapter = adapter

    def vision_layers(self) -> list[int]:
        """ViT blocks whose features the method reads (captured during the vision pass)."""
        return []

    @classmethod
    def layer_defaults(cls, family, num_layers: int) -> dict:
        """The defaults of the method's layer options (``layer``, ``start_layer``) for a
        ``num_layers``-deep model of adapter class ``family`` (benchmarks record them)."""
        import inspect

        params = inspect.signature(cls.__init__).parameters
        return {k: params[k].default for k in ("layer", "start_layer")
                if k in params and isinstance(params[k].default, int)}

    def options(self) -> dict:
        raise NotImplementedError

    def prefill(self, rt, lm, batch: TokenBatch, cache, use_cache, kwargs) -> PrefillResult:
        raise NotImplementedError


@dataclass
class LayerKView:
    """What a :class:`PruneAfterLayer` method sees when it scores the visual tokens.

    Attributes:
        seq: the sequence layers 0..K ran on ([B, S_ext], S_ext >= S when the method appended
            tokens, e.g. the glimpse token); ``seq.hidden`` is the input of layer K.
        prompt: the prompt as the language model received it ([B, S]).
        rope: (cos, sin) [B, S_ext, head_dim] of ``seq``.
        cache: the DynamicCache (layers 0..K filled), or None.
        sizes: tokens of each image, batch order.
    """

    seq: TokenBatch
    prompt: TokenBatch
    rope: tuple[torch.Tensor, torch.Tensor]
    cache: object
    sizes: list[int]


class PruneAfterLayer(PruningMethod):
    """Layers ``0..K`` run on the whole prompt; a score per visual token picks the survivors of
    each image; the rest leave the hidden states (and, with ``prunes_cache``, the KV caches of
    layers ``0..K``), so layers ``K+1..`` run on the short sequence. Positions are kept.

    Subclasses implement :meth:`score` (and, to change the keep rule, :meth:`select`); they may
    append tokens to the prompt (:meth:`extend`) and change a layer's input (:meth:`before_layer`).
    """

    #: whether the caches of layers 0..K are compacted too (else they keep the whole prompt)
    prunes_cache: bool = False

    def __init__(self, adapter, *, layer: int, keep_ratio: float | None, keep_ratio_required: bool = True):
        super().__init__(adapter)
        self.layer = check_layer("layer", layer, adapter.num_layers)
        self.keep_ratio = check_fraction("keep_ratio", keep_ratio, allow_none=not keep_ratio_required)
        if not self.prunes_cache and self.layer == adapter.num_layers - 1:
            # Nothing runs after the last layer and its cache keeps the whole prompt.
            raise ValueError(f"layer={self.layer} is the last decoder layer: {self.name} would prune nothing there; "
                             f"use layer <= {adapter.num_layers - 2}")

    # -- what a method says ----------------------------------------------------------------
    def score(self, rt, view: LayerKView) -> torch.Tensor:
        """[N] scores of all visual tokens (images concatenated in batch order); higher is kept."""
        raise NotImplementedError

    def select(self, rt, view: LayerKView) -> torch.Tensor:
        """[N] bool keep decisions; by default the top ``ceil(keep_ratio * n)`` of each item (an
        image, or a whole video over all its frames)."""
        return keep_mask_from_scores(self.score(rt, view), view.sizes, keep_ratio=self.keep_ratio,
                                     scores_are_logits=False)

    def extend(self, rt, batch: TokenBatch) -> TokenBatch:
        """The sequence layers 0..K run on (default: the prompt itself)."""
        return batch

    def before_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The input of decoder layer ``layer`` (<= K) given the previous layer's output."""
        return hidden

    # -- the skeleton ------------------------------------------------------------------------
    def prefill(self, rt, lm, batch: TokenBatch, cache, use_cache, kwargs) -> PrefillResult:
        K, name = self.layer, self.name
        seq = self.extend(rt, batch)
        mask = causal_mask(lm.config, seq.hidden, seq.mask2d)
        rope = rt.adapter.rotary(seq.hidden, seq.pos)
        hidden = seq.hidden
        with nvtx.range(f"{name}.layers_0_K"):
            for i in range(K + 1):
                hidden = self.before_layer(i, hidden)
                if i == K:
                    seq.hidden = hidden
                hidden = hf.call_layer(lm.layers[i], hidden, mask=mask, rope=rope, text_pos=seq.text_pos,
                                       cache=cache, use_cache=use_cache, **kwargs)
                hidden = seq.add_deepstack(i, hidden)
        sizes = image_sizes(batch.visual, getattr(rt.ctx, "image_sizes", None))
        with nvtx.range(f"{name}.score"):
            keep_vis = self.select(rt, LayerKView(seq, batch, rope, cache, sizes))
        keep = seq.valid & ~seq.visual
        keep[:, batch.hidden.shape[1]:] = False  # tokens the method appended leave here
        scatter_visual(keep, batch.visual, keep_vis)

        seq.hidden = hidden
        with nvtx.range(f"{name}.compact"):
            cached = []
            if cache is not None and self.prunes_cache:
                for i in range(K + 1):
                    cached += list(hf.layer_kv(cache, i))
            short, cached = compact_batch(seq, keep, cached)
            for i in range(len(cached) // 2):
                hf.set_layer_kv(cache, i, cached[2 * i], cached[2 * i + 1])
            if short.mask2d is not None and bool(short.mask2d.bool().all()):
                short.mask2d = None
        with nvtx.range(f"{name}.layers_K1_L"):
            short.hidden = run_layers(rt, lm, short, range(K + 1, len(lm.layers)), cache, use_cache, kwargs)
        layer_masks = None  # every layer's cache holds `short`
        if not self.prunes_cache:
            L, full, kept = len(lm.layers), seq.valid.long(), short.valid.long()
            layer_masks = [full] * (K + 1) + [kept] * (L - K - 1) if K + 1 < L else [full] * L
        stats = sample_stats(batch, keep_vis, sizes, getattr(rt.ctx, "item_kinds", None))
        return PrefillResult(short.hidden, short, stats, layer_masks)


__all__ = ["PruningMethod", "PruneAfterLayer", "LayerKView", "check_fraction", "check_int", "check_layer",
           "image_sizes", "scatter_visual"]
