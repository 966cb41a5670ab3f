"""Model-agnostic pieces shared by every method: the sequence being pruned, masks, the keep rule,
compaction of hidden states + KV cache, and the mapping of generate's full-length mask onto the
pruned cache during decoding.

Conventions
-----------
* ``B`` batch, ``S`` current sequence length, ``H`` hidden size, ``P`` rows of rotary positions
  (3 for Qwen2.5-VL's M-RoPE, 1 for 1D RoPE).
* Batches are left padded, as HF ``generate`` expects for decoder-only models; after pruning the
  kept tokens of each sample are re-packed to the right end ("re-padded").
* Positions are never renumbered: a kept token keeps the rotary position it had in the unpruned
  prompt, and decode positions continue the unpruned numbering.

:class:`Runtime` installs a method on one model instance: it wraps exactly two ``forward``
methods of the *instance* (the multimodal model and its language model) plus forward hooks on the
vision tower; ``remove()`` deletes them again, so the class and every other instance are never
touched.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import _ops, hf, nvtx
from .instance_patch import WrappedMethod
from .vision_capture import VisionCaptures, item_runs
from .reference import keep_mask_ref

if TYPE_CHECKING:
    from .models.base import ModelAdapter
from ._ops import compact_tokens


@dataclass
class TokenBatch:
    """The sequence that flows through the decoder layers during a pruned prefill.

    Attributes:
        hidden: [B, S, H] hidden states.
        pos: [P, B, S] int64 rotary positions (P=3 for M-RoPE, P=1 for 1D RoPE).
        text_pos: [B, S] int64 text positions HF passes to the layers (Qwen's 4th row), or None.
        mask2d: [B, S] padding mask (1 real, 0 pad), or None when the batch has no padding.
        index: [B, S] int64 position of each token in the unpruned prompt (-1 for padding).
        visual: [B, S] bool, True for visual tokens (images and videos).
        deepstack: per early decoder layer l, [N, H] rows the model adds to the hidden states of
            the ``N`` visual tokens of this batch (row-major order of ``visual``) after layer l
            (Qwen3-VL's deepstack), or None. The rows belong to the tokens: compaction keeps the
            rows of the kept tokens.
    """

    hidden: torch.Tensor
    pos: torch.Tensor
    text_pos: torch.Tensor | None
    mask2d: torch.Tensor | None
    index: torch.Tensor
    visual: torch.Tensor
    deepstack: list[torch.Tensor] | None = None

    @property
    def valid(self) -> torch.Tensor:
        """[B, S] bool, True for real (non-padding) tokens."""
        if self.mask2d is None:
            return torch.ones(self.index.shape, dtype=torch.bool, device=self.index.device)
        return self.mask2d.bool()

    def add_deepstack(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [B, S, H] (this batch's output of decoder ``layer``) plus that layer's
        deepstack rows at the visual tokens; unchanged past the deepstack layers or without any."""
        if self.deepstack is None or layer >= len(self.deepstack):
            return hidden
        return hf.add_deepstack(hidden, self.visual, self.deepstack[layer])


def keep_mask_from_scores(
    scores: torch.Tensor,
    sizes: list[int],
    *,
    threshold: float = 0.5,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    keep_ratio: float | None = None,
    scores_are_logits: bool = True,
) -> torch.Tensor:
    """Apply the keep rule image by image.

    Args:
        scores: [N] scores of all visual tokens, images concatenated in order.
        sizes: number of tokens of each image (sums to N).
        threshold: keep tokens whose ``sigmoid(logit)`` (or score, when ``scores_are_logits`` is
            False) is strictly above it.
        max_keep_ratio: when more than ``floor(max_keep_ratio * n)`` pass, keep only that many,
            the top-scored.
        min_keep: when fewer than this pass, keep this many top-scored (capped at n).
        keep_ratio: when set, ignore the threshold and keep exactly ``ceil(keep_ratio * n)``
            top-scored tokens of each image.

    Returns:
        [N] bool keep mask. Ties are broken towards the earlier token, so the rule is
        deterministic.

    On a GPU (compiled kernels loaded) the rule runs as one ``keep_mask`` kernel over all
    images, with no host synchronization and bit-identical results.
    """
    if _ops.kernels_active(scores.device):
        return _ops.keep_mask(
            scores.detach(), _ops.cu_seqlens_from_sizes(sizes, scores.device), threshold=threshold,
            max_keep_ratio=max_keep_ratio, min_keep=min_keep, keep_ratio=keep_ratio,
            scores_are_logits=scores_are_logits,
        )
    # The PyTorch path is the reference itself (one definition of the rule, also the kernel's oracle).
    return keep_mask_ref(scores, _ops.cu_seqlens_from_sizes(sizes, "cpu"), threshold=threshold,
                         max_keep_ratio=max_keep_ratio, min_keep=min_keep, keep_ratio=keep_ratio,
                         scores_are_logits=scores_are_logits)


def compact_batch(batch: TokenBatch, keep: torch.Tensor, caches: list[torch.Tensor]) -> tuple[TokenBatch, list[torch.Tensor]]:
    """Gather the kept tokens of ``batch`` and of the given cache tensors, re-padded on the left.

    Args:
        batch: the current sequence ([B, S] everywhere).
        keep: [B, S] bool; must be False at padding.
        caches: tensors [B, heads, S, head_dim] (keys and values of the cached layers).

    Returns:
        The compacted batch ([B, S'] with S' the largest kept count) and the compacted caches.
        The only host synchronisation is reading S'.
    """
    rows = [batch.pos]
    if batch.text_pos is not None:
        rows.append(batch.text_pos[None])
    rows.append(batch.index[None])
    rows.append(batch.visual.long()[None])
    packed = torch.cat(rows, 0)
    mask = batch.valid.long() if batch.mask2d is None else batch.mask2d
    hidden, caches, packed, mask = compact_tokens(keep, batch.hidden, caches, packed, mask)
    p = batch.pos.shape[0]
    pos = packed[:p]
    text_pos = packed[p] if batch.text_pos is not None else None
    index = packed[-2]
    # Padding slots come back as 0; mark them -1 so they never alias token 0.
    index = torch.where(mask.bool(), index, torch.full_like(index, -1))
    visual = packed[-1].bool()
    deepstack = None
    if batch.deepstack is not None:
        rows = keep[batch.visual]  # the kept visual tokens, in the row-major order the rows are in
        deepstack = [d[rows] for d in batch.deepstack]
    return TokenBatch(hidden, pos, text_pos, mask, index, visual, deepstack), caches


def causal_mask(config, hidden: torch.Tensor, mask2d: torch.Tensor | None):
    """The attention mask HF's attention implementations expect, for a prefill over ``hidden``.

    Built from the 2D padding mask alone (no cache), which is exact for a prefill that starts
    from an empty cache and lets every layer phase of a pruned forward get its own mask.
    """
    return hf.causal_mask(config, hidden, mask2d)


def run_layers(rt, lm, batch: TokenBatch, layers: range, cache, use_cache, kwargs) -> torch.Tensor:
    """Run decoder ``layers`` over ``batch`` (its own mask and rotary tables); returns the hidden states."""
    hidden = batch.hidden
    if len(layers) == 0:
        return hidden
    mask = causal_mask(lm.config, hidden, batch.mask2d)
    rope = rt.adapter.rotary(hidden, batch.pos)
    for i in layers:
        hidden = hf.call_layer(lm.layers[i], hidden, mask=mask, rope=rope, text_pos=batch.text_pos, cache=cache,
                               use_cache=use_cache, **kwargs)
        hidden = batch.add_deepstack(i, hidden)
    return hidden


def sample_stats(batch: TokenBatch, keep_vis: torch.Tensor, sizes: list[int], kinds: list[str] | None = None) -> list[dict]:
    """Per-sample counts for ``handle.stats``: prompt length, visual tokens, kept, and per visual
    item (``"images"`` and ``"videos"``, each in prompt order, ``{"tokens", "kept"}`` per item).

    Args:
        batch: the prompt ([B, S]); items are consumed in batch order.
        keep_vis: [N] bool over all visual tokens, items concatenated.
        sizes: tokens of each visual item (an image or a whole video).
        kinds: ``"image"`` or ``"video"`` per item (None: all images).
    """
    kinds = kinds if kinds is not None else ["image"] * len(sizes)
    per_sample = batch.visual.sum(1).tolist()
    kept_per_item, start = [], 0
    for n in sizes:
        kept_per_item.append(int(keep_vis[start:start + n].sum()))
        start += n
    stats, item = [], 0
    for b, n in enumerate(per_sample):
        found = {"image": [], "video": []}
        consumed = 0
        while consumed < n:
            if item >= len(sizes):
                raise RuntimeError(f"token_prune: the visual items' token counts {sizes} do not add up to the "
                                   f"visual tokens of each sample {per_sample}")
            found[kinds[item]].append({"tokens": sizes[item], "kept": kept_per_item[item]})
            consumed += sizes[item]
            item += 1
        kept = sum(i["kept"] for i in found["image"] + found["video"])
        stats.append({"prompt_len": int(batch.valid[b].sum()), "visual_tokens": n, "kept_tokens": kept,
                      "keep_ratio": kept / n if n else 1.0, "images": found["image"], "videos": found["video"]})
    return stats


@dataclass
class PrefillResult:
    """What a method's prefill hands back to the runtime.

    Attributes:
        hidden: [B, S_out, H] last hidden states, before the final norm.
        batch: the tokens those rows are (``batch.index`` maps rows to prompt positions).
        stats: one dict per sample.
        layer_masks: per decoder layer, [B, C_l] padding mask of what that layer's KV cache
            holds after prefill (C_l its padded length). None: every layer holds ``batch``.
    """

    hidden: torch.Tensor
    batch: TokenBatch
    stats: list[dict]
    layer_masks: list[torch.Tensor] | None = None


@dataclass
class PrunedCacheState:
    """What decoding needs to know about a cache that was pruned during prefill.

    ``prompt_len`` is the unpruned prompt length HF's 2D mask starts with; ``layer_masks[l]``
    [B, C_l] the padding mask of the prompt tokens layer l's cache kept. When every layer kept
    the same tokens (``uniform``), decoding can use HF's own forward with a remapped mask;
    otherwise each layer needs its own mask.
    """

    cache_ref: weakref.ref
    prompt_len: int
    layer_masks: list[torch.Tensor]

    @property
    def uniform(self) -> bool:
        first = self.layer_masks[0]
        return all(m is first for m in self.layer_masks)

    def owns(self, cache) -> bool:
        return cache is not None and self.cache_ref() is cache

    def next_position(self, cache) -> int:
        """Unpruned index of the next token: prompt length plus tokens decoded since prefill."""
        return self.prompt_len + hf.layer_length(cache, 0) - self.layer_masks[0].shape[1]

    def layer_mask(self, layer: int, attention_mask: torch.Tensor | None, q_len: int, cache_len: int) -> torch.Tensor:
        """Map generate's full-length mask [B, prompt_len + t] onto layer ``layer``'s cache.

        Args:
            attention_mask: HF's 2D mask in unpruned numbering ([B, prompt_len + t + q]), in
                this layer's numbering already ([B, cache_len + q]), or None (no padding added
                after the prompt).
            q_len: tokens in this forward.
            cache_len: entries in this layer's cache before this forward.

        Returns:
            [B, cache_len + q_len] mask in the layer's cache order.
        """
        kept = self.layer_masks[layer]
        generated = cache_len - kept.shape[1]  # tokens decoded since the prefill
        if attention_mask is None:
            tail = kept.new_ones(kept.shape[0], generated + q_len)
            return torch.cat([kept, tail], 1)
        width = attention_mask.shape[1]
        if width == cache_len + q_len:
            return attention_mask  # already in pruned numbering
        if width != self.prompt_len + generated + q_len:
            raise ValueError(
                f"attention_mask has {width} columns, but a pruned cache of {cache_len} tokens built from a "
                f"{self.prompt_len}-token prompt expects {self.prompt_len + generated + q_len} "
                f"(unpruned numbering) or {cache_len + q_len} (pruned numbering)"
            )
        return torch.cat([kept.to(attention_mask.dtype), attention_mask[:, self.prompt_len:]], 1)


def decode_mask(impl: str, mask2d: torch.Tensor, q_len: int, dtype: torch.dtype):
    """Attention mask for ``q_len`` new tokens that follow a cache, in the form ``impl`` wants.

    Args:
        impl: the model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...).
        mask2d: [B, kv] 1 for real keys (the cache plus the new tokens, in order).
        q_len: new tokens, the last ``q_len`` keys.
        dtype: model dtype (eager masks are additive).

    Returns:
        [B, 1, q, kv] bool (sdpa), [B, 1, q, kv] additive float (eager), or the 2D mask itself
        (flash-attention variants, which apply causality themselves).
    """
    if "flash" in impl:
        return mask2d
    kv = mask2d.shape[1]
    qpos = torch.arange(kv - q_len, kv, device=mask2d.device)
    kpos = torch.arange(kv, device=mask2d.device)
    allowed = mask2d.bool()[:, None, None, :] & (kpos[None, :] <= qpos[:, None])[None, None]
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask2d.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise NotImplementedError(f"token_prune: attention implementation {impl!r} is not supported for decoding "
                              "with per-layer pruned caches; use sdpa, eager or flash_attention_2")


@dataclass
class CallContext:
    """Inputs of one outer model call that the language-model forward needs."""

    input_ids: torch.Tensor | None = None
    #: [B, S] kind of each token (0 text, 1 image, 2 video), when the call gave embeddings
    #: instead of ids
    kinds: torch.Tensor | None = None
    #: [B, S] padding mask of the call (to recognise generate's repeated prompts)
    attention_mask: torch.Tensor | None = None
    #: the call computes a loss from labels: the output must stay aligned with the input
    aligned: bool = False
    #: the VIP's attention segments: [n_segments, 2] token grids (rows, cols), or (positions
    #: [N, 2], tokens per segment); an image is one segment, a video one per temporal group
    image_grids: torch.Tensor | None = None
    #: per condition layer [N, width] pooled vision features, natural token order
    vision_features: list[torch.Tensor] | None = None
    #: tokens of each visual item (an image, or a whole video), in prompt order: the unit of the
    #: keep rules
    image_sizes: list[int] | None = None
    #: ``"image"`` or ``"video"`` per item of ``image_sizes``
    item_kinds: list[str] | None = None
    extra: dict = field(default_factory=dict)


class Runtime:
    """Installs a method on one model instance and carries per-call state."""

    def __init__(self, adapter: ModelAdapter, method):
        self.adapter = adapter
        self.method = method
        self.ctx: CallContext | None = None
        #: labels of the top-level call in progress (the loss needs aligned outputs)
        self._labels: torch.Tensor | None = None
        self.pruned: PrunedCacheState | None = None
        self.stats: list[dict] = []
        self.keep_mask: torch.Tensor | None = None
        self.captures = VisionCaptures()
        self._encoding: str | None = None  # kind of the encoder method running, if any
        self._hooks: list = []
        self._saved: list[tuple[torch.nn.Module, str, bool, object]] = []

    # -- install / remove ----------------------------------------------------------------
    def install(self) -> None:
        outer, lm = self.adapter.outer, self.adapter.lm
        try:
            self.wrap_method(self.adapter.model, "forward", self._top_forward)
            self.wrap_method(outer, "forward", self._outer_forward)
            self.wrap_method(lm, "forward", self._lm_forward)
            for kind, name in self.adapter.encoder_methods.items():
                if callable(getattr(outer, name, None)) and (kind == "image" or self.adapter.supports_video):
                    self.wrap_method(outer, name, self._encoder(kind))
            # Installed even when the method reads no features: the hooks also record each
            # image's token grid, which per-image keep rules need.
            self._hooks.extend(self.adapter.install_vision_hooks(self, self.method.vision_layers()))
        except Exception:
            self.remove()  # a failed patch leaves the model untouched
            raise

    def wrap_method(self, module: torch.nn.Module, name: str, fn) -> None:
        """Replace ``module.<name>`` on this instance by ``fn(original, module, *args, **kwargs)``
        until :meth:`remove` (a deep copy of the model gets the class's method back)."""
        had = name in module.__dict__
        previous = module.__dict__.get(name)
        module.__dict__[name] = WrappedMethod(module, getattr(module, name), fn, self)
        self._saved.append((module, name, had, previous))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, name, had, previous in reversed(self._saved):
            if had:
                module.__dict__[name] = previous
            else:
                module.__dict__.pop(name, None)
        self._saved.clear()
        self.captures.clear()
        self.ctx = None
        self.pruned = None

    # -- vision features -------------------------------------------------------------------
    def _encoder(self, kind: str):
        """Wrapper of the outer model's encoder method for ``kind``: vision passes inside it are
        recorded as that kind (the outermost one: a video encoder may call the image encoder)."""
        def run(orig, module, *args, **kwargs):
            prev = self._encoding
            self._encoding = prev or kind
            try:
                return orig(*args, **kwargs)
            finally:
                self._encoding = prev
        return run

    def add_vision_capture(self, feats: list[torch.Tensor], layout, items: list[int] | None = None,
                           segments: list[int] | None = None) -> None:
        """Called by the adapter's hooks after every vision-tower pass.

        Args:
            feats: per condition [N, C] features (segments concatenated, natural token order).
            layout: the VIP segments, a grid [n_segments, 2] or (positions [N, 2], tokens per
                segment).
            items: tokens of each item (an image, or a whole video); default one per segment.
            segments: segments of each item (a video: one per temporal group); default 1 each.

        The pass is tagged with the kind of the encoder method running it (untagged outside one).
        """
        self.captures.add(feats, layout, items, segments, kind=self._encoding)

    # -- forwards ------------------------------------------------------------------------
    def _top_forward(self, orig, module, *args, **kwargs):
        """The ``...ForConditionalGeneration`` forward: only the labels matter here (a loss needs
        one output row per input token, so the pruned prefill returns aligned rows)."""
        labels = kwargs.get("labels")
        if labels is None:
            return orig(*args, **kwargs)
        self._labels = labels
        try:
            return orig(*args, **kwargs)
        finally:
            self._labels = None

    def _outer_forward(self, orig, module, *args, **kwargs):
        bound = inspect.signature(orig).bind_partial(*args, **kwargs)
        a = bound.arguments
        extra = a.get("kwargs", {})
        get = lambda k: a.get(k, extra.get(k))  # noqa: E731
        input_ids, embeds, mask = get("input_ids"), get("inputs_embeds"), get("attention_mask")
        labels = self._labels
        ctx = CallContext(input_ids=input_ids, aligned=labels is not None,
                          attention_mask=mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None)
        if input_ids is None and embeds is not None:
            # Embeddings in place of ids: find the visual placeholders the way HF does.
            ctx.kinds = self.adapter.visual_kinds(inputs_embeds=embeds)
        cache = hf.get_cache(a) or hf.get_cache(extra)
        if self.pruned is not None and self.pruned.owns(cache) and get("position_ids") is None:
            pos = self.adapter.decode_positions(self, dict(a, **extra))
            if pos is not None:
                args, kwargs = _rebind(orig, args, kwargs)
                kwargs["position_ids"] = pos
        prev, self.ctx = self.ctx, ctx
        try:
            out = orig(*args, **kwargs)
        finally:
            self.ctx = prev
        if labels is not None and ctx.extra.get("pruned"):
            _check_labels_on_kept(labels, self.keep_mask, ctx.attention_mask)
        return out

    def _lm_forward(self, orig, lm, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                    inputs_embeds=None, use_cache=None, **kwargs):
        # The cache is the 4th parameter in every supported release; by keyword it is `cache` or
        # `past_key_values` depending on the release (see hf.py).
        ctx = self.ctx
        other = hf.pop_cache(kwargs)
        cache = cache if cache is not None else other
        cache_len = hf.layer_length(cache, 0)
        if cache_len == 0:
            visual = kinds = None
            if ctx is not None:
                kinds = ctx.kinds if ctx.kinds is not None else self.adapter.visual_kinds(input_ids=ctx.input_ids)
                visual = None if kinds is None else kinds > 0
            if visual is not None and bool(visual.any()):
                if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
                    raise NotImplementedError(
                        "token_prune: pruning needs the 2D padding mask, but this call passed prepared 4D masks "
                        "(generate does so for a static cache: cache_implementation='static'); use the default "
                        "dynamic cache")
                if cache is not None and not hf.is_dynamic_cache(cache):
                    raise NotImplementedError(
                        f"token_prune: pruning needs a DynamicCache (got {type(cache).__name__}, e.g. from "
                        "cache_implementation='static'); use the default dynamic cache")
                feats, layout, items, item_kinds = self.captures.take(
                    kinds, input_ids=ctx.input_ids, mask=ctx.attention_mask,
                    required=bool(self.method.vision_layers()))
                if layout is not None:
                    feats, layout, items, item_kinds = self.adapter.resolve_layout(feats, layout, items, item_kinds,
                                                                                   kinds)
                if items is None:
                    items, item_kinds = item_runs(kinds)
                ctx.vision_features, ctx.image_grids, ctx.image_sizes, ctx.item_kinds = feats, layout, items, item_kinds
                ctx.extra["pruned"] = True
                return self._pruned_prefill(lm, input_ids, attention_mask, position_ids, cache,
                                            inputs_embeds, use_cache, visual, kwargs)
            self.pruned = None
            self.stats = []
            self.keep_mask = None
        elif self.pruned is not None and self.pruned.owns(cache):
            if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
                raise NotImplementedError("token_prune: decoding on a pruned cache needs a 2D attention mask")
            ref = inputs_embeds if inputs_embeds is not None else input_ids
            q_len = ref.shape[1]
            # generate restarting from this cache (a second turn) counts the cached tokens from the
            # pruned length and re-feeds prompt tokens the cache holds already: keep only the new
            # ones. The mask (unpruned numbering) or, without padding, the positions tell which.
            new = q_len
            if attention_mask is not None:
                new = attention_mask.shape[1] - self.pruned.next_position(cache)
            elif position_ids is not None:
                pos, text = self.adapter.split_positions(position_ids, ref.shape[0], q_len, ref.device)
                text = pos[0] if text is None else text
                new = int((text[0] >= self.pruned.next_position(cache)).sum())
            if 0 < new < q_len:
                q_len = new
                if inputs_embeds is not None:
                    inputs_embeds = inputs_embeds[:, -new:]
                if input_ids is not None:
                    input_ids = input_ids[:, -new:]
                if position_ids is not None:
                    position_ids = position_ids[..., -new:]
            if not self.pruned.uniform:
                return self._layerwise_decode(lm, input_ids, attention_mask, position_ids, cache,
                                              inputs_embeds, use_cache, kwargs)
            attention_mask = self.pruned.layer_mask(0, attention_mask, q_len, cache_len)
        return orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, use_cache=use_cache, **hf.cache_kwargs(orig, cache), **kwargs)

    def _pruned_prefill(self, lm, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, visual, kwargs):
        cfg = lm.config
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(key, False):
                raise NotImplementedError(f"token_prune: {key}=True is not supported on a pruned prefill")
        if use_cache is None:
            use_cache = cfg.use_cache
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = hf.new_cache(cfg)
        if cache is not None and not hf.is_dynamic_cache(cache):
            raise NotImplementedError(
                f"token_prune: pruning needs a DynamicCache (got {type(cache).__name__}); "
                "use the default cache implementation"
            )
        B, S, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        pos, text_pos = self.adapter.split_positions(position_ids, B, S, dev)
        mask2d = attention_mask
        if mask2d is not None and bool(mask2d.bool().all()):
            mask2d = None  # no padding: lets SDPA use its causal fast path, as HF does
        index = torch.arange(S, device=dev).expand(B, S)
        if mask2d is not None:
            index = torch.where(mask2d.bool(), index, torch.full_like(index, -1))
        deep_mask, deepstack = hf.pop_deepstack(kwargs)
        if deepstack is not None and not torch.equal(deep_mask.to(dev), visual.to(dev)):
            raise RuntimeError("token_prune: the model's deepstack positions differ from the visual tokens found "
                               "in the prompt")
        batch = TokenBatch(inputs_embeds, pos, text_pos, mask2d, index, visual.to(dev), deepstack)

        with nvtx.range("token_prune.prefill"):
            res = self.method.prefill(self, lm, batch, cache, use_cache, kwargs)
        hidden = lm.norm(res.hidden)
        out = res.batch
        if self.ctx is not None and self.ctx.aligned:
            # A loss from labels needs one output row per input token: kept rows go back to their
            # places, the rows of pruned tokens are zeros (labels must ignore them; checked).
            full = hidden.new_zeros(B, S, hidden.shape[-1])
            ok = out.index >= 0
            rows = torch.arange(B, device=dev)[:, None].expand_as(out.index)
            full[rows[ok], out.index[ok]] = hidden[ok]
            hidden = full
        # Which prompt positions reach the output, in the caller's [B, S] coordinates.
        keep_mask = torch.zeros(B, S + 1, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)[:, None].expand_as(out.index)
        # Padding slots (index -1) land in the spare last column, which is dropped.
        keep_mask[rows, torch.where(out.index >= 0, out.index, S)] = out.index >= 0
        self.keep_mask = keep_mask[:, :S]
        stats = res.stats
        if cache is not None:
            masks = res.layer_masks
            if masks is None:
                shared = out.valid.long()
                masks = [shared] * hf.cache_layers(cache)
            self.pruned = PrunedCacheState(cache_ref=weakref.ref(cache), prompt_len=S, layer_masks=masks)
            kv = torch.stack([m.bool().sum(1) for m in masks], 1).tolist()  # [B, layers]
            for i, s in enumerate(stats):
                s["kv_len"] = kv[i]
                s["kv_len_padded"] = [int(hf.layer_kv(cache, i)[0].shape[-2]) for i in range(hf.cache_layers(cache))]
        self.stats = stats
        return hf.lm_output(hidden, cache if use_cache else None)

    def _layerwise_decode(self, lm, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs):
        """Decode step on a cache whose layers hold different tokens: one mask per layer."""
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(key, False):
                raise NotImplementedError(f"token_prune: {key}=True is not supported on a pruned cache")
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        B, q, _ = inputs_embeds.shape
        if position_ids is None:
            raise ValueError("token_prune: decoding on a per-layer pruned cache needs position_ids "
                             "(generate passes them)")
        pos, text_pos = self.adapter.split_positions(position_ids, B, q, inputs_embeds.device)
        rope = self.adapter.rotary(inputs_embeds, pos)
        impl = hf.attn_implementation(lm.config)
        hidden = inputs_embeds
        with nvtx.range("token_prune.layerwise_decode"):
            for i, layer in enumerate(lm.layers):
                m2d = self.pruned.layer_mask(i, attention_mask, q, hf.layer_length(cache, i))
                mask = decode_mask(impl, m2d, q, hidden.dtype)
                hidden = hf.call_layer(layer, hidden, mask=mask, rope=rope, text_pos=text_pos, cache=cache,
                                       use_cache=use_cache, **kwargs)
        return hf.lm_output(lm.norm(hidden), cache)


def _check_labels_on_kept(labels: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Every real position whose output a label is scored against must have been kept.

    HF scores the output at position t against ``labels[t + 1]``; pruned tokens have no output.
    """
    scored = labels[:, 1:] != -100
    lost = scored & ~keep[:, :-1].to(labels.device)
    if mask is not None:
        lost &= mask[:, :-1].bool().to(labels.device)
    if bool(lost.any()):
        b, t = (int(i) for i in lost.nonzero()[0])
        raise ValueError(
            f"token_prune: labels score the output of a pruned token (sample {b}, position {t}: labels[{t + 1}] "
            "is not -100). Pruned tokens have no output; give them (and the label after each) -100, as for the "
            "image tokens of a prompt, or compute the loss without pruning")


def _rebind(fn, args, kwargs):
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    extra = bound.arguments.pop("kwargs", {})
    return (), {**bound.arguments, **extra}
