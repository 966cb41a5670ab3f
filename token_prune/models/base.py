"""The per-model adapter interface.

A :class:`ModelAdapter` knows one HF architecture: where its decoder layers are, how its rotary
positions and q/k projections work, which tokens are visual, and how to read intermediate vision
features. The :class:`~token_prune.runtime.Runtime` installs a method through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import hf

if TYPE_CHECKING:
    from ..runtime import Runtime


class ModelAdapter:
    """Base class: one subclass per HF ``model_type``.

    Besides the hooks the runtime needs on a loaded model (instance methods), an adapter carries
    everything else the package knows about its family, as class-level data and classmethods
    that work from a config alone: the tiny random-weight model the tests and demos build, how
    the family's processor lays out an image in the prompt and in ``pixel_values``, and the
    shapes the cost model needs. No other module names a family.
    """

    model_type: str = ""
    #: whether the family takes videos (``pixel_values_videos``); their tokens are visual tokens
    supports_video: bool = False
    #: the outer model's methods that encode each kind of visual input; the runtime wraps them to
    #: tag every vision-tower pass with its kind
    encoder_methods: dict[str, str] = {"image": "get_image_features", "video": "get_video_features"}
    #: the transformers classes of the family (public API names)
    hf_model_class: str = ""
    #: a short human name, for reports
    display_name: str = ""
    #: decoder depth -> the public GlimpsePrune layer K for that model size
    glimpse_layers: dict[int, int] = {}
    #: relative depth used for K when the model size has no public setting
    glimpse_relative_depth: float = 0.64
    #: how the glimpse attention map is scored: raw scaled logits or log-softmax over the keys
    glimpse_score: str = "logits"
    #: hidden size -> ALVTS selector rank published for that model size
    alvts_ranks: dict[int, int] = {}
    #: whether each attention layer's queries/keys are plain projections rotated over the whole
    #: head (what the fused glimpse-map kernel assumes); else :meth:`project_qk` is used
    standard_qk: bool = True

    def __init__(self, model):
        self.model = model

    # -- structure -----------------------------------------------------------------------
    @property
    def outer(self) -> torch.nn.Module:
        """The module whose forward sees ``input_ids`` and the image inputs (every supported
        family's ``*ForConditionalGeneration`` keeps it at ``.model``)."""
        return self.model.model

    @property
    def lm(self) -> torch.nn.Module:
        """The decoder-only language model (has ``layers``, ``norm``, ``rotary_emb``)."""
        return self.outer.language_model

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

    @property
    def video_token_id(self) -> int | None:
        """The placeholder id of video tokens, or None for a family without video input."""
        return getattr(self.model.config, "video_token_id", None) if self.supports_video else None

    @classmethod
    def attention_layers_for(cls, num_layers: int) -> list[int]:
        """The attention (not linear-attention) layers of the family's ``num_layers``-deep decoder
        as published; every layer unless the family is hybrid."""
        return list(range(num_layers))

    @classmethod
    def glimpse_layer_for(cls, num_layers: int, attention: list[int] | None = None) -> int:
        """GlimpsePrune's default K for a ``num_layers``-deep decoder: the public setting of that
        model size, else ``glimpse_relative_depth`` of the depth; on a hybrid decoder the nearest
        attention layer at or before it (``attention``: the layers, default the published ones)."""
        if num_layers in cls.glimpse_layers:
            k = cls.glimpse_layers[num_layers]
        else:
            k = min(num_layers - 1, max(0, round(cls.glimpse_relative_depth * num_layers)))
        attention = cls.attention_layers_for(num_layers) if attention is None else attention
        return max((i for i in attention if i <= k), default=attention[0])

    @classmethod
    def fastv_layer_for(cls, num_layers: int, layer: int) -> int:
        """FastV's default K: ``layer``, or on a hybrid decoder the first attention layer at or after it."""
        attention = cls.attention_layers_for(num_layers)
        return next((i for i in attention if i >= layer), attention[-1])

    @classmethod
    def alvts_rank_for(cls, hidden_size: int) -> int:
        """ALVTS selector rank: the published one for this size, else hidden/16 (256 for 4096)."""
        return cls.alvts_ranks.get(hidden_size, max(4, hidden_size // 16))

    def visual_mask(self, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, S] bool: the visual placeholder tokens (images and videos) of a prompt given as ids
        [B, S] or as embeddings [B, S, H] (rows equal to a placeholder's embedding, as HF finds them)."""
        kinds = self.visual_kinds(input_ids, inputs_embeds)
        return None if kinds is None else kinds > 0

    def visual_kinds(self, input_ids: torch.Tensor | None = None,
                     inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, S] int64 kind of every prompt token: 0 text, 1 image, 2 video (``vision_capture.KIND_IDS``,
        the numbering of HF's ``mm_token_type_ids``)."""
        ids = [(1, self.image_token_id)] + ([(2, self.video_token_id)] if self.video_token_id is not None else [])
        if input_ids is not None:
            out = torch.zeros_like(input_ids)
            for kind, tok in ids:
                out[input_ids == tok] = kind
            return out
        if inputs_embeds is not None:
            out = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            for kind, tok in ids:
                token = torch.tensor(tok, device=inputs_embeds.device)
                placeholder = self.model.get_input_embeddings()(token).to(inputs_embeds.dtype)
                out[(inputs_embeds == placeholder).all(-1)] = kind
            return out
        return None

    def default_glimpse_layer(self) -> int:
        return self.glimpse_layer_for(self.num_layers, hf.attention_layers(self.lm_config))

    def default_alvts_rank(self) -> int:
        return self.alvts_rank_for(self.hidden_size)

    # -- per-architecture numerics -------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, head_dim] for rotary positions ``pos`` [P, B, S]."""
        raise NotImplementedError

    def split_positions(self, position_ids, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalise the ``position_ids`` the LM received into (pos [P, B, S], text_pos [B, S] or None)."""
        raise NotImplementedError

    def text_positions(self, position_ids, batch: int, seq: int, device) -> torch.Tensor:
        """[B, S] the unpruned token indices (text positions) of a call's ``position_ids``."""
        pos, text = self.split_positions(position_ids, batch, seq, device)
        return pos[0] if text is None else text

    def project_qk(self, layer_idx: int, hidden_in: torch.Tensor, cos, sin, want_k: bool = True):
        """Queries [B, heads, T, d] and keys [B, kv_heads, T, d] (rotary applied) that decoder layer
        ``layer_idx`` computes for its input ``hidden_in`` [B, T, H]."""
        attn = self.lm.layers[layer_idx].self_attn
        h = self.lm.layers[layer_idx].input_layernorm(hidden_in)
        B, T, _ = h.shape
        d = self.head_dim
        q = hf.apply_rotary(head_norm(attn, "q", attn.q_proj(h).view(B, T, -1, d)).transpose(1, 2), cos, sin)
        if not want_k:
            return q, None
        k = hf.apply_rotary(head_norm(attn, "k", attn.k_proj(h).view(B, T, -1, d)).transpose(1, 2), cos, sin)
        return q, k

    def query_projection(self, attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [heads*d, H], bias [heads*d] or None): the rows of an attention layer's
        ``q_proj`` that make its queries (a family whose ``q_proj`` also makes an output gate
        overrides this)."""
        return attn.q_proj.weight, attn.q_proj.bias

    def gate_attention_output(self, attn: torch.nn.Module, normed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The attention output [B, T, heads*d] of rows whose normed input is ``normed`` [B, T, H],
        as it enters ``o_proj`` (unchanged unless the family gates it)."""
        return out

    def layer_rows_with_context(self, layer_idx: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                valid: torch.Tensor, rows: torch.Tensor, rows_hidden: torch.Tensor,
                                rows_cos: torch.Tensor, rows_sin: torch.Tensor, cache=None,
                                normed: torch.Tensor | None = None) -> torch.Tensor:
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
            normed: [B, S, H] ``input_layernorm(hidden)``, if the caller has it (None: computed).

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
        h = layer.input_layernorm(hidden) if normed is None else normed
        k = head_norm(attn, "k", attn.k_proj(h).view(B, S, -1, d)).transpose(1, 2)
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
        out = self.gate_attention_output(attn, layer.input_layernorm(rows_hidden), out.reshape(B, Sq, -1).contiguous())
        x = rows_hidden + attn.o_proj(out)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def linear_rows_with_context(self, layer_idx: int, hidden: torch.Tensor, mask2d: torch.Tensor | None,
                                 rows: torch.Tensor, rows_hidden: torch.Tensor, cache=None) -> torch.Tensor:
        """Linear-attention decoder layer ``layer_idx`` (hybrid decoders) for a subset of rows,
        with every token in the recurrence.

        The token mixer runs over all ``S`` tokens (each one's key and value enter the state, which
        is cached as the layer would cache it); the residual, the post-attention norm and the MLP
        only for the ``S'`` selected rows: the ALVTS "context" reading at a linear layer.

        Args:
            hidden: [B, S, H] the layer's input for every token.
            mask2d: [B, S] padding mask, or None without padding.
            rows: [B, S'] int64 position in ``hidden`` of each selected row, -1 for padding slots.
            rows_hidden: [B, S', H] those rows' hidden states.
            cache: a DynamicCache, or None.

        Returns:
            [B, S', H] the layer's output for the selected rows (padding slots: unspecified).
        """
        layer = self.lm.layers[layer_idx]
        mixed = hf.call_linear_mixer(layer, layer.input_layernorm(hidden),
                                     mask=hf.recurrent_mask(self.lm_config, hidden, mask2d), cache=cache)
        picked = mixed.gather(1, rows.clamp(min=0)[..., None].expand(-1, -1, mixed.shape[-1]))
        x = rows_hidden + picked
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

    def resolve_layout(self, feats: list[torch.Tensor], layout, items: list[int], item_kinds: list[str],
                       kinds: torch.Tensor) -> tuple[list, object, list[int], list[str]]:
        """The vision features, VIP segments and keep-rule items a prefill uses, from the vision
        passes that fit its prompt.

        Families whose vision pass cannot tell where one image ends (InternVL: the tiles of every
        image concatenated, each image's tile count only in the prompt) record a pass of one item
        per tile and regroup it here; the default returns it unchanged.

        Args:
            feats: per condition [N, C], as the adapter's hooks recorded them.
            layout: the VIP segments (a grid [n, 2] or (positions [N, 2], tokens per segment)).
            items: tokens per item; item_kinds: ``"image"`` / ``"video"`` per item.
            kinds: [B, S] kind of every prompt token (0 text, 1 image, 2 video).
        """
        return feats, layout, items, item_kinds

    def decode_positions(self, runtime: "Runtime", kwargs: dict):
        """Fill in ``position_ids`` for a decode call on a pruned cache when the caller gave none."""
        return None


    # -- the family without a model: prompts, pixels, tiny models, cost-model shapes ------------
    #: text tokens the tiny/synthetic prompts put after each image (a separator that keeps two
    #: images apart where the family has no image start/end tokens)
    image_separator_tokens: int = 0
    #: (height, width) of the image the ``--tiny`` benchmark uses
    tiny_image: tuple[int, int] = (64, 64)
    #: whether the visual layout has row-newline tokens (the last column of each row; no box
    #: target, no vision feature)
    has_newline_tokens: bool = False

    @classmethod
    def special_ids(cls, config) -> set[int]:
        """Every special token id of the family's config (never used as text)."""
        ids = set()
        for obj in (config, config.text_config):
            for key in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                        "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(obj, key, None)
                if isinstance(v, int):
                    ids.add(v)
                elif isinstance(v, (list, tuple)):
                    ids.update(int(x) for x in v)
        return ids

    @classmethod
    def image_tokens(cls, config, height: int, width: int) -> int:
        """Visual tokens the family's processor puts in the prompt for a ``height x width`` image."""
        raise NotImplementedError

    @classmethod
    def prompt_tokens(cls, config, parts: list) -> tuple[list[int], list[int]]:
        """Token ids and ``mm_token_type_ids`` (0 text, 1 image, 2 video) of a prompt.

        Args:
            parts: ``("text", [ids])``, ``("image", n_tokens)`` and (families that take videos)
                ``("video", tokens per temporal group)`` items in prompt order.
        """
        raise NotImplementedError

    # Videos (families with ``supports_video``): what the tiny prompts, ``select_sample`` and the
    # benchmark's video setting need.
    @classmethod
    def video_tokens(cls, config, frames: int, height: int, width: int) -> list[int]:
        """Visual tokens of each temporal group of a ``frames x height x width`` video."""
        raise NotImplementedError(f"{cls.display_name or cls.model_type} takes no videos")

    @classmethod
    def random_video_pixels(cls, config, videos: list[tuple[int, int, int]], generator: torch.Generator, device,
                            dtype) -> dict:
        """Video inputs (``pixel_values_videos`` and the family's size tensors) for random videos of
        the given (frames, height, width), in prompt order."""
        raise NotImplementedError(f"{cls.display_name or cls.model_type} takes no videos")

    @classmethod
    def video_rows(cls, inputs: dict, first: int, count: int) -> dict:
        """The video inputs of videos ``first .. first+count-1`` (prompt order) of a batch."""
        raise NotImplementedError

    @classmethod
    def video_sizes(cls, config, inputs: dict) -> list[int]:
        """Visual tokens of each video of a batch's inputs, in prompt order."""
        raise NotImplementedError

    @classmethod
    def uses_token_types(cls) -> bool:
        """Whether the model takes ``mm_token_type_ids``."""
        return False

    @classmethod
    def random_pixels(cls, config, images: list[tuple[int, int]], generator: torch.Generator, device,
                      dtype) -> dict:
        """Pixel inputs (``pixel_values`` and the family's size tensors) for random images of the
        given (height, width), in prompt order, laid out as the family's processor lays them out."""
        raise NotImplementedError

    @classmethod
    def encode_image(cls, config, image, max_side: int) -> tuple[dict, int]:
        """(pixel inputs, visual token count) of one PIL RGB ``image`` as the family's processor
        would encode it (pixels scaled to [-1, 1]; Qwen: longer side at most ``max_side``)."""
        raise NotImplementedError

    @classmethod
    def pixel_rows(cls, inputs: dict, first: int, count: int, config=None) -> dict:
        """The pixel inputs of images ``first .. first+count-1`` (prompt order) of a batch
        (``config``: the model's, for families whose pixel rows per image follow from it)."""
        raise NotImplementedError

    @classmethod
    def tiny_config(cls, **overrides):
        """Config of the family's tiny random-weight model (tests, demo, ``--tiny``)."""
        raise NotImplementedError

    @classmethod
    def config_of_size(cls, **sizes):
        """A config of the family at the given size (the accuracy benchmark's small model; see the
        Qwen2.5-VL adapter for the arguments). Families that do not offer it raise."""
        raise NotImplementedError(f"{cls.display_name or cls.model_type}: no config_of_size (the small trained "
                                  "model of the accuracy benchmark needs one)")

    #: extra options of the tiny model's construction (``hf.model_from_config``)
    tiny_model_options: dict = {}

    @classmethod
    def tiny_model(cls, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0,
                   device="cpu", **config_overrides):
        """The tiny model, random weights (seeded), eval mode; generation never stops early."""
        import transformers

        config = cls.tiny_config(**config_overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = hf.model_from_config(getattr(transformers, cls.hf_model_class), config,
                                         attn_implementation=attn_implementation, dtype=dtype,
                                         **cls.tiny_model_options)
        pad = config.text_config.pad_token_id
        model.generation_config.pad_token_id = pad if pad is not None else 0
        model.generation_config.eos_token_id = None  # random weights: never stop early in tests
        return model.to(device).eval()

    @classmethod
    def demo_images(cls) -> list[tuple[tuple[int, int], ...]]:
        """Images of the demo's two prompts (valid sizes for the tiny model)."""
        return [((128, 128),), ((96, 160),)]

    @classmethod
    def vision_units(cls, config, height: int, width: int) -> dict:
        """What the vision tower processes for one image, for the cost model
        (``{"vision_patches": n}`` or ``{"tiles": n}``)."""
        raise NotImplementedError

    @classmethod
    def cost_vision_spec(cls, config):
        """The cost model's :class:`~token_prune.costmodel.VisionSpec` of the tower."""
        raise NotImplementedError

    @classmethod
    def qkv_bias(cls, config) -> bool:
        """Whether the decoder's q/k/v projections have biases (a Qwen2 decoder always has them)."""
        tc = config.text_config
        return tc.model_type == "qwen2" or bool(getattr(tc, "attention_bias", False))

    @classmethod
    def head_norms(cls, config) -> bool:
        """Whether the decoder normalises queries and keys per head (``q_norm`` / ``k_norm``)."""
        return False



def head_norm(attn: torch.nn.Module, which: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, heads, d] through the attention's per-head RMSNorm ``q_norm`` / ``k_norm``
    (decoders that normalise queries and keys per head before rotary), or unchanged without one."""
    norm = getattr(attn, f"{which}_norm", None)
    return x if norm is None else norm(x)



def pil_to_tensor(image) -> torch.Tensor:
    """A PIL RGB image as [3, H, W] float in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float() / 127.5 - 1.0


__all__ = ["ModelAdapter", "head_norm", "pil_to_tensor"]
