"""The per-model adapter interface and the machinery that installs a method on a model instance.

A :class:`ModelAdapter` knows one HF architecture: where its decoder layers are, how its rotary
positions and q/k projections work, which tokens are visual, and how to read intermediate vision
features. The :class:`Runtime` wraps exactly two ``forward`` methods of the *instance* (the
multimodal model and its language model) plus forward hooks on the vision tower; ``remove()``
deletes them again, so the class and every other instance are never touched.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from .. import hf, nvtx
from ..runtime import CallContext, PrunedCacheState, TokenBatch, decode_mask


class ModelAdapter:
    """Base class: one subclass per HF ``model_type``."""

    model_type: str = ""
    #: decoder depth -> the public GlimpsePrune layer K for that model size
    glimpse_layers: dict[int, int] = {}
    #: relative depth used for K when the model size has no public setting
    glimpse_relative_depth: float = 0.64
    #: how the glimpse attention map is scored: raw scaled logits or log-softmax over the keys
    glimpse_score: str = "logits"
    #: hidden size -> ALVTS selector rank published for that model size
    alvts_ranks: dict[int, int] = {}

    def __init__(self, model):
        self.model = model

    # -- structure -----------------------------------------------------------------------
    @property
    def outer(self) -> torch.nn.Module:
        """The module whose forward sees ``input_ids`` and the image inputs."""
        raise NotImplementedError

    @property
    def lm(self) -> torch.nn.Module:
        """The decoder-only language model (has ``layers``, ``norm``, ``rotary_emb``)."""
        raise NotImplementedError

    @property
    def lm_config(self):
        return self.lm.config

    @property
    def num_layers(self) -> int:
        return self.lm_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.lm_config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.lm_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.lm_config.num_key_value_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.lm_config, "head_dim", None) or self.hidden_size // self.num_heads

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def default_glimpse_layer(self) -> int:
        n = self.num_layers
        if n in self.glimpse_layers:
            return self.glimpse_layers[n]
        return min(n - 1, max(0, round(self.glimpse_relative_depth * n)))

    def default_alvts_rank(self) -> int:
        """Published rank for this size, else hidden/16 (256 for a 4096-wide model)."""
        return self.alvts_ranks.get(self.hidden_size, max(4, self.hidden_size // 16))

    # -- per-architecture numerics -------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, head_dim] for rotary positions ``pos`` [P, B, S]."""
        raise NotImplementedError

    def split_positions(self, position_ids, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalise the ``position_ids`` the LM received into (pos [P, B, S], text_pos [B, S] or None)."""
        raise NotImplementedError

    def project_qk(self, layer_idx: int, hidden_in: torch.Tensor, cos, sin, want_k: bool = True):
        """Queries [B, heads, T, d] and keys [B, kv_heads, T, d] (rotary applied) that decoder layer
        ``layer_idx`` computes for its input ``hidden_in`` [B, T, H]."""
        attn = self.lm.layers[layer_idx].self_attn
        h = self.lm.layers[layer_idx].input_layernorm(hidden_in)
        B, T, _ = h.shape
        d = self.head_dim
        q = hf.apply_rotary(attn.q_proj(h).view(B, T, -1, d).transpose(1, 2), cos, sin)
        if not want_k:
            return q, None
        k = hf.apply_rotary(attn.k_proj(h).view(B, T, -1, d).transpose(1, 2), cos, sin)
        return q, k

    def layer_rows_with_context(self, layer_idx: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                valid: torch.Tensor, rows: torch.Tensor, rows_hidden: torch.Tensor,
                                rows_cos: torch.Tensor, rows_sin: torch.Tensor, cache=None) -> torch.Tensor:
        """Decoder layer ``layer_idx`` for a subset of rows that attend to *every* token.

        Keys and values are computed for all ``S`` tokens from their current hidden states (and
        appended to ``cache`` as the layer itself would); queries, the output projection and the
        MLP only for the ``S'`` selected rows. This is the ALVTS reading in which a token that
        skips a layer is not updated by it but stays visible to the tokens that go through it.

        Args:
            hidden: [B, S, H] the layer's input for every token.
            cos, sin: [B, S, head_dim] rotary tables of every token.
            valid: [B, S] bool real (non-padding) tokens.
            rows: [B, S'] int64 position in ``hidden`` of each selected row, -1 for padding slots.
            rows_hidden: [B, S', H] those rows' hidden states (``hidden`` gathered at ``rows``).
            rows_cos, rows_sin: [B, S', head_dim] their rotary tables.
            cache: a DynamicCache, or None.

        Returns:
            [B, S', H] the layer's output for the selected rows (padding slots: unspecified).
        """
        layer = self.lm.layers[layer_idx]
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise NotImplementedError(f"token_prune: {type(attn).__name__} has no {name}; this decoder layer "
                                          "cannot run a row subset against full context")
        B, S, _ = hidden.shape
        Sq = rows_hidden.shape[1]
        d = self.head_dim
        h = layer.input_layernorm(hidden)
        k = attn.k_proj(h).view(B, S, -1, d).transpose(1, 2)
        v = attn.v_proj(h).view(B, S, -1, d).transpose(1, 2)
        k = hf.apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = hf.cache_update(cache, k, v, layer_idx)
        q, _ = self.project_qk(layer_idx, rows_hidden, rows_cos, rows_sin, want_k=False)
        kpos = torch.arange(S, device=hidden.device)
        # Causal in the original order; padding slots may see everything so that no row is empty.
        allowed = (valid[:, None, :] & (kpos[None, None, :] <= rows[:, :, None])) | (rows < 0)[:, :, None]
        impl = hf.attn_implementation(self.lm.config)
        fn = hf.attention_function(attn, impl)
        if impl == "eager":
            zero = torch.zeros((), dtype=q.dtype, device=q.device)
            mask = torch.where(allowed, zero, torch.finfo(q.dtype).min)[:, None]
        else:
            # Flash-attention kernels take no arbitrary mask; SDPA does (and is what HF uses by default).
            mask = allowed[:, None]
        out, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        x = rows_hidden + attn.o_proj(out.reshape(B, Sq, -1).contiguous())
        return x + layer.mlp(layer.post_attention_layernorm(x))

    # -- vision side ---------------------------------------------------------------------
    def vision_width(self) -> int:
        raise NotImplementedError

    def vision_depth(self) -> int:
        raise NotImplementedError

    def default_vision_layers(self) -> list[int]:
        """Four ViT blocks spread over the depth, deep to shallow (31, 23, 15, 7 for 32 blocks)."""
        d = self.vision_depth()
        return [max(0, d * (4 - i) // 4 - 1) for i in range(4)]

    def install_vision_hooks(self, runtime: "Runtime", layers: list[int]) -> list:
        """Register hooks that hand every vision-tower pass to ``runtime.add_vision_capture``:
        the pooled features of ``layers`` ([N, width] each, natural token order, images
        concatenated) and the token grid [n_images, 2] (rows, cols) of the images."""
        raise NotImplementedError

    def decode_positions(self, runtime: "Runtime", kwargs: dict):
        """Fill in ``position_ids`` for a decode call on a pruned cache when the caller gave none."""
        return None


class Runtime:
    """Installs a method on one model instance and carries per-call state."""

    def __init__(self, adapter: ModelAdapter, method):
        self.adapter = adapter
        self.method = method
        self.ctx: CallContext | None = None
        self.pruned: PrunedCacheState | None = None
        self.stats: list[dict] = []
        self.keep_mask: torch.Tensor | None = None
        self.vision_captures: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._hooks: list = []
        self._saved: list[tuple[torch.nn.Module, bool, object]] = []

    # -- install / remove ----------------------------------------------------------------
    def install(self) -> None:
        outer, lm = self.adapter.outer, self.adapter.lm
        try:
            self._wrap(outer, self._outer_forward)
            self._wrap(lm, self._lm_forward)
            # Installed even when the method reads no features: the hooks also record each
            # image's token grid, which per-image keep rules need.
            self._hooks.extend(self.adapter.install_vision_hooks(self, self.method.vision_layers()))
        except Exception:
            self.remove()  # a failed patch leaves the model untouched
            raise

    def _wrap(self, module: torch.nn.Module, fn) -> None:
        had = "forward" in module.__dict__
        orig = module.__dict__.get("forward")
        bound = module.forward  # the class method bound to the instance (or a previous instance attribute)
        ref = weakref.ref(self)

        def forward(*args, **kwargs):
            rt = ref()
            if rt is None:
                return bound(*args, **kwargs)
            return fn(bound, module, *args, **kwargs)

        forward.__wrapped__ = bound
        forward.__signature__ = inspect.signature(bound)
        module.forward = forward
        self._saved.append((module, had, orig))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, had, orig in reversed(self._saved):
            if had:
                module.forward = orig
            else:
                module.__dict__.pop("forward", None)
        self._saved.clear()
        self.ctx = None
        self.pruned = None

    # -- vision features -------------------------------------------------------------------
    def add_vision_capture(self, feats: list[torch.Tensor], grid: torch.Tensor) -> None:
        self.vision_captures.append((feats, grid))
        del self.vision_captures[:-4]  # a few passes (images, videos) between two prefills at most

    def take_vision_capture(self, n_visual: int, required: bool = True):
        """The latest vision pass whose token count matches the prompt's image tokens.

        Returns (features, layout, per-image token counts); (None, None, None) when nothing
        matches and ``required`` is False.
        """
        for feats, layout in reversed(self.vision_captures):
            sizes = layout_sizes(layout)
            if sum(sizes) == n_visual:
                self.vision_captures.clear()
                return feats, layout, sizes
        counts = [sum(layout_sizes(layout)) for _, layout in self.vision_captures]
        self.vision_captures.clear()
        if not required:
            return None, None, None
        raise RuntimeError(
            f"token_prune: the prompt has {n_visual} image tokens but no vision-tower pass of that size was seen "
            f"(seen: {counts or 'none'}). Pass pixel_values to the patched model (precomputed image features "
            "from before patching cannot be used), and use num_beams=1, num_return_sequences=1."
        )

    # -- forwards ------------------------------------------------------------------------
    def _outer_forward(self, orig, module, *args, **kwargs):
        bound = inspect.signature(orig).bind_partial(*args, **kwargs)
        a = bound.arguments
        extra = a.get("kwargs", {})
        get = lambda k: a.get(k, extra.get(k))  # noqa: E731
        ctx = CallContext(input_ids=get("input_ids"))
        cache = hf.get_cache(a) or hf.get_cache(extra)
        if self.pruned is not None and self.pruned.owns(cache) and get("position_ids") is None:
            pos = self.adapter.decode_positions(self, dict(a, **extra))
            if pos is not None:
                args, kwargs = _rebind(orig, args, kwargs)
                kwargs["position_ids"] = pos
        prev, self.ctx = self.ctx, ctx
        try:
            return orig(*args, **kwargs)
        finally:
            self.ctx = prev

    def _lm_forward(self, orig, lm, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                    inputs_embeds=None, use_cache=None, **kwargs):
        # The cache is the 4th parameter in every supported release; by keyword it is `cache` or
        # `past_key_values` depending on the release (see hf.py).
        ctx = self.ctx
        other = hf.pop_cache(kwargs)
        cache = cache if cache is not None else other
        cache_len = hf.layer_length(cache, 0)
        if cache_len == 0:
            wants = ctx is not None and ctx.input_ids is not None
            if wants and not isinstance(attention_mask, dict) and (attention_mask is None or attention_mask.ndim == 2):
                visual = ctx.input_ids == self.adapter.image_token_id
                if bool(visual.any()):
                    ctx.vision_features, ctx.image_grids, ctx.image_sizes = self.take_vision_capture(
                        int(visual.sum()), required=bool(self.method.vision_layers()))
                    return self._pruned_prefill(lm, input_ids, attention_mask, position_ids, cache,
                                                inputs_embeds, use_cache, visual, kwargs)
            self.pruned = None
            self.stats = []
            self.keep_mask = None
        elif self.pruned is not None and self.pruned.owns(cache):
            q_len = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
            if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
                raise NotImplementedError("token_prune: decoding on a pruned cache needs a 2D attention mask")
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
        batch = TokenBatch(inputs_embeds, pos, text_pos, mask2d, index, visual.to(dev))

        with nvtx.range("token_prune.prefill"):
            res = self.method.prefill(self, lm, batch, cache, use_cache, kwargs)
        hidden = lm.norm(res.hidden)
        out = res.batch
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


def layout_sizes(layout) -> list[int]:
    """Tokens per image of a vision layout: a grid [n_images, 2] or (positions [N, 2], lengths)."""
    if isinstance(layout, torch.Tensor):
        return (layout[:, 0] * layout[:, 1]).tolist()
    return [int(n) for n in layout[1]]


def _rebind(fn, args, kwargs):
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    extra = bound.arguments.pop("kwargs", {})
    return (), {**bound.arguments, **extra}


__all__ = ["ModelAdapter", "Runtime"]
