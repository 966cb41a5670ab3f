"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``):
a CLIP vision tower, a two-layer projector and a Llama-style decoder with 1D RoPE.

Vision conditions
-----------------
The VIP's conditions are CLIP hidden states with the CLS token dropped, as in the public
GlimpsePrune LLaVA code, which reads ``vision_tower(..., output_hidden_states=True)
.hidden_states[i][:, 1:]`` for ``i`` in ``selected_visual_layers`` (23, 17, 11, 5 for the 24-layer
CLIP-L/336). So ``vision_layers`` index CLIP's ``hidden_states``: 0 is the embeddings (after the
pre-layernorm), ``i >= 1`` the output of encoder layer ``i - 1``; a ``d``-layer CLIP has ``d + 1``
valid indices. Forward hooks on the encoder layers capture exactly those tensors during every call
of ``get_image_features`` (which ``generate`` in transformers 5.2x calls before the first forward).

Token layouts
-------------
* LLaVA-1.5: every image is one ``side x side`` grid (24 x 24 = 576 tokens for CLIP-L/336), its
  tokens row-major in the prompt; images in prompt order. Layout: a grid tensor ``[n_images, 2]``.
* LLaVA-NeXT (anyres): an image's tokens are the base tile's ``side x side`` grid, then the
  high-res tiles stitched into one ``(rows_tiles * side) x (cols_tiles * side)`` grid, unpadded
  (rows or columns that only cover the letterbox padding removed, as ``unpad_image`` does), with an
  ``image_newline`` token after each of its rows. The captured CLIP features are arranged into
  exactly that order. A newline token has no CLIP feature; its condition is a **zero vector**: a
  fixed, content-free marker that no real CLIP hidden state is close to (they are un-normalised
  residual-stream states), so a VIP can tell newlines apart, and it does not smear one row's
  content onto a token that carries none. Layout: ``(positions [N, 2], lengths)`` where each
  token's (row, col) is its position on its own grid (base: on the base grid; high-res: on the
  unpadded high-res grid, counting from 0; newline: ``(row, cols)``, one past its row's last
  column), and each image (base + high-res + newlines) is one VIP attention segment.

Only the ``"default"`` feature-select strategy (CLS dropped, as in every released LLaVA-1.5 /
LLaVA-NeXT checkpoint) is supported.
"""

from __future__ import annotations

import inspect

import torch

from .. import hf
from ..instance_patch import forward_hook, forward_pre_hook
from .base import ModelAdapter, pil_to_tensor


def anyres_tiles(image_size, grid_pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of high-res tiles LLaVA-NeXT cuts an image of ``image_size`` (height, width) into."""
    height, width = hf.select_best_resolution([int(image_size[0]), int(image_size[1])], grid_pinpoints)
    return height // tile_size, width // tile_size


def unpad_window(image_size, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of a ``grid_h x grid_w`` high-res token grid that cover the
    image itself rather than the letterbox padding around it (LLaVA-NeXT's unpadding)."""
    orig_h, orig_w = int(image_size[0]), int(image_size[1])
    if orig_w / orig_h > grid_w / grid_h:
        new_h = int(round(orig_h * (grid_w / orig_w), 7))
        pad = (grid_h - new_h) // 2
        return pad, grid_h - pad, 0, grid_w
    new_w = int(round(orig_w * (grid_h / orig_h), 7))
    pad = (grid_w - new_w) // 2
    return 0, grid_h, pad, grid_w - pad


# Token ids of the tiny LLaVA vocabularies (real checkpoints: pad 0 / 32001, bos 1, eos 2, <image> 32000).
TINY_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, image_token_id=3)

#: LLaVA-NeXT's anyres resolutions [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], scaled
#: from 336-px to 56-px tiles.
TINY_GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def _tiny_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, vision_layers,
                vocab_size, image_size, patch_size) -> dict:
    """Config arguments shared by the tiny LLaVA-1.5 and LLaVA-NeXT: a CLIP tower and a Llama."""
    text_config = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
        # Larger than the real 0.02 so a random tiny model has peaked, tie-free logits.
        initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=TINY_IDS["bos_token_id"], eos_token_id=TINY_IDS["eos_token_id"],
        pad_token_id=TINY_IDS["pad_token_id"],
    )
    vision_config = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                         num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                         patch_size=patch_size, projection_dim=32)
    return dict(text_config=text_config, vision_config=vision_config, image_token_index=TINY_IDS["image_token_id"],
                vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                image_seq_length=(image_size // patch_size) ** 2)


class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    hf_model_class = "LlavaForConditionalGeneration"
    display_name = "LLaVA-1.5"
    # No image start/end tokens: the tiny prompts separate consecutive images by one text token.
    image_separator_tokens = 1
    tiny_image = (56, 56)
    # Public GlimpsePrune settings: LLaVA-1.5-7B K=21 of 32, 13B K=26 of 40 (0-indexed).
    glimpse_layers = {32: 21, 40: 26}
    glimpse_score = "log_softmax"
    #: the only ``vision_feature_select_strategy`` the feature capture supports
    feature_strategy = "default"

    def __init__(self, model):
        super().__init__(model)
        tower = model.model.vision_tower
        if not hasattr(getattr(tower, "vision_model", tower), "encoder"):
            raise NotImplementedError(
                f"token_prune: {self.model_type} with a {type(tower).__name__} vision tower is not supported "
                "(a CLIP-style tower with encoder.layers is expected)"
            )
        strategy = getattr(model.config, "vision_feature_select_strategy", self.feature_strategy)
        if strategy != self.feature_strategy:
            raise NotImplementedError(
                f"token_prune: {self.model_type} with vision_feature_select_strategy={strategy!r} is not supported "
                f"(only {self.feature_strategy!r}, as the released checkpoints of the family use)"
            )

    # -- structure -------------------------------------------------------------------------
    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    def clip_layers(self) -> torch.nn.ModuleList:
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def tokens_per_side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    # -- numerics --------------------------------------------------------------------------
    def rotary(self, hidden, pos):
        return hf.rotary(self.lm, hidden, pos[0])

    def split_positions(self, position_ids, batch, seq, device):
        # HF's Llama uses arange(S) (past length 0) when no positions are given, ignoring padding.
        if position_ids is None:
            return torch.arange(seq, device=device).view(1, 1, -1).expand(1, batch, -1), None
        if position_ids.ndim == 1:
            return position_ids.view(1, 1, -1).expand(1, batch, -1), None
        if position_ids.ndim == 2:
            return position_ids.expand(batch, -1)[None], None
        if position_ids.ndim == 3 and position_ids.shape[0] == 1:
            return position_ids.expand(1, batch, -1), None
        raise ValueError(f"token_prune: {self.model_type} expects 1D rotary positions [B, S], got {tuple(position_ids.shape)}")

    def decode_positions(self, runtime, kwargs):
        # HF's Llama numbers tokens from the cache length when no positions are given (mask or not);
        # pruning shrank the cache, so continue the unpruned numbering instead.
        cache = hf.get_cache(kwargs)
        ids = kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        b, q = ref.shape[:2]
        st = runtime.pruned
        generated = hf.layer_length(cache, 0) - st.layer_masks[0].shape[1]
        start = st.prompt_len + generated
        return torch.arange(start, start + q, device=ref.device).view(1, -1).expand(b, -1)

    # -- vision side -----------------------------------------------------------------------
    def vision_width(self):
        return self.model.config.vision_config.hidden_size

    def vision_depth(self):
        # vision_layers index CLIP's hidden_states: embeddings + one per encoder layer.
        return self.model.config.vision_config.num_hidden_layers + 1

    def default_vision_layers(self):
        """hidden_states indices 23, 17, 11, 5 for a 24-layer CLIP; the same spread for other depths."""
        d = self.model.config.vision_config.num_hidden_layers
        return [max(0, d * (4 - i) // 4 - 1) for i in range(4)]

    def arrange(self, hidden: torch.Tensor, call_args: dict) -> torch.Tensor:
        """CLIP hidden states [n_tiles, 1 + side^2, C] of one ``get_image_features`` call ->
        [N, C] in the order of the image tokens in the prompt."""
        return hidden[:, 1:].reshape(-1, hidden.shape[-1])

    def layout(self, n_tiles: int, call_args: dict):
        side = self.tokens_per_side
        return torch.tensor([[side, side]], dtype=torch.long).expand(n_tiles, 2).clone()

    def vision_record(self, feats: list[torch.Tensor], n_tiles: int, call_args: dict) -> tuple[list, object]:
        """(features, layout) handed to the runtime for one ``get_image_features`` call."""
        return feats, self.layout(n_tiles, call_args)

    def install_vision_hooks(self, runtime, layers):
        clip = self.clip_layers()
        depth = len(clip)
        for v in layers:
            if not 0 <= v <= depth:
                raise ValueError(f"vision layer {v} outside CLIP's hidden_states (0..{depth}, 0 = embeddings)")
        active = [False]
        captured: dict[int, torch.Tensor] = {}
        tiles = [None]  # tiles the tower encoded in the current call (None: it did not run)
        hooks = []

        def output_hook(idx):
            def hook(module, args, output):
                if active[0]:
                    captured[idx] = output[0] if isinstance(output, tuple) else output
            return hook

        def input_hook(module, args, kwargs):
            if active[0]:
                h = args[0] if args else kwargs["hidden_states"]
                tiles[0] = h.shape[0]
                if 0 in layers:
                    captured[0] = h

        # Always hooked: it also counts the tiles, for methods that need only the layout.
        hooks.append(forward_pre_hook(clip[0], input_hook, with_kwargs=True))
        for v in sorted(set(layers) - {0}):
            hooks.append(forward_hook(clip[v - 1], output_hook(v)))

        sigs = {name: inspect.signature(getattr(self.outer, name)) for name in self.vision_entry_points()}
        adapter = self

        def capture_during(name, record):
            sig = sigs[name]

            def wrapper(orig, outer, *args, **kwargs):
                bound = sig.bind_partial(*args, **kwargs)
                call_args = dict(bound.arguments)
                call_args.update(call_args.pop("kwargs", {}) or {})
                strategy = call_args.get("vision_feature_select_strategy")
                if strategy is not None and strategy != adapter.feature_strategy:
                    raise NotImplementedError(f"token_prune: vision_feature_select_strategy={strategy!r} is not "
                                              f"supported (only {adapter.feature_strategy!r})")
                captured.clear()
                tiles[0] = None
                active[0] = True
                try:
                    out = orig(*args, **kwargs)
                finally:
                    active[0] = False
                if tiles[0] is not None and all(v in captured for v in layers):
                    runtime.add_vision_capture(*record([captured[v] for v in layers], tiles[0], call_args))
                captured.clear()
                return out
            return wrapper

        # The features are read where the model asks for them: generate encodes the images (and
        # videos) before its first forward, outside any forward of the language model.
        for name, record in self.vision_entry_points().items():
            runtime.wrap_method(self.outer, name, capture_during(name, record))
        return hooks

    def vision_entry_points(self) -> dict:
        """The outer model's encoder methods whose tower passes are recorded, each with the
        function ``(hidden states per vision layer, tiles, call arguments) -> add_vision_capture
        arguments`` that turns a pass into features and a layout."""
        return {"get_image_features": self.image_record}

    def image_record(self, hidden: list[torch.Tensor], n_tiles: int, call_args: dict) -> tuple:
        """An image pass: tower hidden states [tiles, tokens, C] per vision layer -> (features
        [N, C] per layer in prompt order, layout)."""
        return self.vision_record([self.arrange(h, call_args) for h in hidden], n_tiles, call_args)

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def image_tokens(cls, config, height, width):
        vc = config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    @classmethod
    def prompt_tokens(cls, config, parts):
        # <bos>, then the text, and each image as a run of <image> tokens.
        bos = config.text_config.bos_token_id
        ids = [bos if bos is not None else 1]
        for kind, value in parts:
            ids += list(value) if kind == "text" else [config.image_token_id] * value
        return ids, [0] * len(ids)

    @classmethod
    def random_pixels(cls, config, images, generator, device, dtype):
        # One [3, size, size] row per image: the processor resizes every image to the tower's input.
        size = config.vision_config.image_size
        pixels = torch.randn(len(images), 3, size, size, generator=generator, device=generator.device)
        return dict(pixel_values=pixels.to(device=device, dtype=dtype))

    @classmethod
    def encode_image(cls, config, image, max_side):
        side = config.vision_config.image_size
        return dict(pixel_values=pil_to_tensor(image.resize((side, side)))[None]), cls.image_tokens(config, 0, 0)

    @classmethod
    def pixel_rows(cls, inputs, first, count, config=None):
        # One pixel_values (and image_sizes) row per image, in prompt order.
        return {k: inputs[k][first:first + count] for k in ("pixel_values", "image_sizes") if k in inputs}

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_layers: int = 8, vocab_size: int = 128,
                    image_size: int = 56, patch_size: int = 14):
        """A tiny LLaVA-1.5: a CLIP tower (56-px images, 14-px patches: 4x4 = 16 tokens per image,
        8 layers, features from the second-to-last, CLS dropped) and a 6-layer Llama with GQA."""
        from transformers import LlavaConfig

        return LlavaConfig(**_tiny_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                                         vision_layers, vocab_size, image_size, patch_size))

    @classmethod
    def demo_images(cls):
        return [((56, 56),), ((56, 56),)]

    @classmethod
    def vision_units(cls, config, height, width):
        return {"tiles": 1}

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        pins = tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ())
        return VisionSpec(kind="clip", depth=vc.num_hidden_layers, width=vc.hidden_size, heads=vc.num_attention_heads,
                          intermediate=vc.intermediate_size, patch=vc.patch_size, in_channels=vc.num_channels,
                          out=config.text_config.hidden_size, image_size=vc.image_size, grid_pinpoints=pins)


class LlavaNextAdapter(LlavaAdapter):
    model_type = "llava_next"
    hf_model_class = "LlavaNextForConditionalGeneration"
    display_name = "LLaVA-NeXT"
    tiny_image = (112, 112)
    has_newline_tokens = True

    @staticmethod
    def _plan(config, size) -> dict:
        """One image's tile grid (rows, cols) and unpadding window on the high-res token grid."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        rows, cols = anyres_tiles(size, config.image_grid_pinpoints, vc.image_size)
        return dict(rows=rows, cols=cols, window=unpad_window(size, rows * side, cols * side))

    def _image_plan(self, call_args: dict) -> list[dict]:
        """Per image: its tile counts and unpadding window, from ``image_sizes`` and the config."""
        sizes = call_args.get("image_sizes")
        if sizes is None:
            raise ValueError("token_prune: LLaVA-NeXT needs image_sizes to lay out the image tokens")
        return [self._plan(self.model.config, size) for size in torch.as_tensor(sizes).tolist()]

    def arrange(self, hidden, call_args):
        side = self.tokens_per_side
        feats = hidden[:, 1:]  # [tiles of all images, side^2, C]
        C = feats.shape[-1]
        out, start = [], 0
        for p in self._image_plan(call_args):
            n = 1 + p["rows"] * p["cols"]
            tiles = feats[start:start + n]
            start += n
            out.append(tiles[0])  # the base (whole-image) tile, row-major
            if n == 1:
                out.append(tiles.new_zeros(1, C))
                continue
            grid = tiles[1:].view(p["rows"], p["cols"], side, side, C).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(p["rows"] * side, p["cols"] * side, C)
            r0, r1, c0, c1 = p["window"]
            grid = grid[r0:r1, c0:c1]
            newline = grid.new_zeros(grid.shape[0], 1, C)  # no CLIP feature: a zero condition
            out.append(torch.cat([grid, newline], 1).reshape(-1, C))
        if start != feats.shape[0]:
            raise RuntimeError(
                f"token_prune: the vision tower saw {feats.shape[0]} tiles but image_sizes imply {start}")
        return torch.cat(out)

    def layout(self, n_tiles, call_args):
        side = self.tokens_per_side
        base_r = torch.arange(side).repeat_interleave(side)
        base_c = torch.arange(side).repeat(side)
        pos, lengths = [], []
        for p in self._image_plan(call_args):
            pos.append(torch.stack([base_r, base_c], 1))
            n = side * side
            if p["rows"] * p["cols"] == 0:
                pos.append(torch.tensor([[side - 1, side]]))
                n += 1
            else:
                r0, r1, c0, c1 = p["window"]
                h, w = r1 - r0, c1 - c0
                # w + 1 columns per row: the last is the newline token, at column w.
                rr = torch.arange(h).repeat_interleave(w + 1)
                cc = torch.arange(w + 1).repeat(h)
                pos.append(torch.stack([rr, cc], 1))
                n += h * (w + 1)
            lengths.append(n)
        return torch.cat(pos).long(), lengths

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def image_tokens(cls, config, height, width):
        # The base tile's grid, then the unpadded high-res grid with one newline token per row.
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        r0, r1, c0, c1 = cls._plan(config, (height, width))["window"]
        return side * side + (r1 - r0) * (c1 - c0 + 1)

    @classmethod
    def tile_count(cls, config, height: int, width: int) -> int:
        """Tiles (base + high-res) the processor cuts a ``height x width`` image into."""
        plan = cls._plan(config, (height, width))
        return 1 + plan["rows"] * plan["cols"]

    @classmethod
    def random_pixels(cls, config, images, generator, device, dtype):
        # [n_images, max_tiles, 3, size, size]: each image's tiles first, zero padding after.
        size = config.vision_config.image_size
        counts = [cls.tile_count(config, h, w) for h, w in images]
        pixels = torch.zeros(len(images), max(counts), 3, size, size, device=generator.device)
        for i, n in enumerate(counts):
            pixels[i, :n] = torch.randn(n, 3, size, size, generator=generator, device=generator.device)
        return dict(pixel_values=pixels.to(device=device, dtype=dtype),
                    image_sizes=torch.tensor(images, dtype=torch.long, device=device))

    @classmethod
    def encode_image(cls, config, image, max_side):
        # The base tile (the image resized to the tile), then the tiles of the best canvas (aspect
        # kept, centred, zero padded).
        tile = config.vision_config.image_size
        w, h = image.size
        ph, pw = hf.select_best_resolution((h, w), config.image_grid_pinpoints)
        scale = min(pw / w, ph / h)
        nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
        canvas = torch.zeros(3, ph, pw)
        top, left = (ph - nh) // 2, (pw - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = pil_to_tensor(image.resize((nw, nh)))
        tiles = [pil_to_tensor(image.resize((tile, tile)))]
        for r in range(ph // tile):
            for c in range(pw // tile):
                tiles.append(canvas[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
        return (dict(pixel_values=torch.stack(tiles)[None], image_sizes=torch.tensor([[h, w]])),
                cls.image_tokens(config, h, w))

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_layers: int = 8, vocab_size: int = 128,
                    image_size: int = 56, patch_size: int = 14, image_grid_pinpoints=None):
        """A tiny LLaVA-NeXT: the tiny LLaVA-1.5 parts plus anyres tiling over
        :data:`TINY_GRID_PINPOINTS` (56-px tiles of 4x4 tokens)."""
        from transformers import LlavaNextConfig

        parts = _tiny_parts(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                            vision_layers, vocab_size, image_size, patch_size)
        pins = image_grid_pinpoints or [[h * image_size // 56, w * image_size // 56] for h, w in TINY_GRID_PINPOINTS]
        return LlavaNextConfig(image_grid_pinpoints=pins, **parts)

    @classmethod
    def demo_images(cls):
        return [((112, 56),), ((60, 90),)]

    @classmethod
    def vision_units(cls, config, height, width):
        return {"tiles": cls.tile_count(config, height, width)}


__all__ = ["LlavaAdapter", "LlavaNextAdapter", "anyres_tiles", "unpad_window", "TINY_GRID_PINPOINTS"]
