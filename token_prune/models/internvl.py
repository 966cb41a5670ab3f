"""InternVL (``InternVLForConditionalGeneration``, transformers' own classes; the InternVL2.5,
InternVL3 and InternVL3.5 layouts): an InternViT tower, pixel shuffle, an MLP projector and a
Qwen2 / Llama / Qwen3 decoder with 1D RoPE.

Token layout
------------
The processor cuts an image into a canvas of ``rows x cols`` tiles of the tower's input size
(448 px), the canvas chosen by the image's aspect ratio (at most 12 tiles by default), row-major,
and appends a thumbnail (the whole image resized to one tile) when there is more than one tile.
Each tile becomes ``g x g`` tokens (``g = image_size / patch / 2``: 16 for 448 px and 14-px
patches) after the pixel shuffle, which concatenates each 2x2 group of patch features. In the
prompt an image is ``<img>``, its tiles' tokens tile after tile (row-major inside each tile),
``</img>``; the thumbnail's tokens come last.

For the VIP each image is **one attention segment**, and each token's 2D position is geometric:
a token at ``(i, j)`` inside tile ``(tr, tc)`` of the canvas sits at ``(tr * g + i, tc * g + j)``
on the image's global token grid; the thumbnail's tokens sit at ``(i, j)`` on their own ``g x g``
grid; a one-tile image is one ``g x g`` grid. A video frame is one tile (its own segment).

Where the canvas comes from: the model receives only ``pixel_values`` (every tile of every image
concatenated) and the prompt; neither the original size nor ``rows x cols`` reach it. The tiles
per image follow from the prompt (each image is one run of ``<IMG_CONTEXT>`` tokens, ``g * g`` per
tile). The arrangement follows from the pixels: the thumbnail and the canvas are two resamplings
of the same image, so for the right ``rows x cols`` the tiles' per-token mean colours, put side by
side and averaged over ``rows x cols`` blocks, equal the thumbnail's per-token mean colours (up
to resampling error), while any other factorisation scrambles the image. Each factorisation of
the tile count is scored so; the best wins (ties, e.g. a blank image: the squarest canvas).

Vision conditions
-----------------
``vision_layers`` index the tower's ``hidden_states`` as for LLaVA (0 = the embeddings, ``i`` the
output of encoder layer ``i - 1``; CLS dropped), each mean-pooled over the 2x2 patch group that
the pixel shuffle turns into one token (as Qwen2.5-VL's conditions are pooled over its merge
group). The default takes four spread over the depth, the deepest being the one the model itself
feeds its projector (``vision_feature_layer = -1``): 24, 17, 11, 5 for the 24-layer InternViT-300M.
The public GlimpsePrune InternVL2.5-8B setup reads layer 21 (of 32) with raw attention logits.

InternVL3.5 has the same layout with a Qwen3 decoder, whose per-head q/k norms the shared q/k
code applies (``models.base.head_norm``).
"""

from __future__ import annotations

import torch

from .base import pil_to_tensor
from .llava import LlavaAdapter

# Token ids of the tiny InternVL vocabulary. Real checkpoints (Qwen2 tokenizer): <img> 151665,
# </img> 151666, <IMG_CONTEXT> 151667: the start and end tokens sit just below the image token,
# which is how prompts are built from a config alone.
TINY_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, image_token_id=5)
#: the processor's default cap on the tiles of one image (``max_patches``)
MAX_TILES = 12


def optimal_canvas(height: int, width: int, tile: int, max_tiles: int = MAX_TILES,
                   min_tiles: int = 1) -> tuple[int, int]:
    """(rows, cols) of tiles the InternVL processor cuts a ``height x width`` image into: the
    canvas whose aspect ratio is closest to the image's; on a tie, the one with more tiles while
    the image's area exceeds half the canvas's."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best[1], best[0]


def tile_count(rows: int, cols: int) -> int:
    """Tiles of a ``rows x cols`` canvas as the model sees them (plus the thumbnail when > 1)."""
    return rows * cols + (1 if rows * cols > 1 else 0)


def canvas_from_colours(tiles: torch.Tensor, thumb: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the canvas whose tiles, side by side and block-averaged, best reproduce the
    thumbnail.

    Args:
        tiles: [t, g, g, 3] per-token mean colours of the canvas tiles, in prompt order.
        thumb: [g, g, 3] those of the thumbnail.
    """
    t, g = tiles.shape[0], tiles.shape[1]
    shapes = sorted(((t // c, c) for c in range(1, t + 1) if t % c == 0), key=lambda rc: (abs(rc[0] - rc[1]), rc[0]))
    errors = []
    for rows, cols in shapes:
        mosaic = tiles.reshape(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1)
        pooled = mosaic.reshape(g, rows, g, cols, -1).mean((1, 3))
        errors.append((pooled - thumb).double().pow(2).mean())
    errors = torch.stack(errors).tolist()  # one host sync per image
    return shapes[min(range(len(shapes)), key=lambda i: errors[i])]


def grid_positions(rows: int, cols: int, g: int) -> torch.Tensor:
    """[rows * cols * g * g, 2] global (row, col) of the tokens of a canvas, in prompt order (tile
    after tile, row-major inside each tile)."""
    tr, tc, i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), torch.arange(g), torch.arange(g),
                                  indexing="ij")
    return torch.stack([tr * g + i, tc * g + j], -1).reshape(-1, 2)


def image_positions(rows: int, cols: int, g: int) -> torch.Tensor:
    """[tokens, 2] VIP positions of one image: the canvas on its global grid, then the thumbnail
    (when there is one) on its own ``g x g`` grid."""
    pos = grid_positions(rows, cols, g)
    if rows * cols > 1:
        pos = torch.cat([pos, grid_positions(1, 1, g)])
    return pos


def visual_runs(visual: torch.Tensor) -> list[int]:
    """Lengths of the runs of visual tokens of ``visual`` [B, S], row by row (one run per image)."""
    v = visual.to(torch.int8)
    edges = torch.nn.functional.pad(v, (1, 1)).diff(dim=1)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    return (ends[:, 1] - starts[:, 1]).tolist()


class InternVLAdapter(LlavaAdapter):
    model_type = "internvl"
    hf_model_class = "InternVLForConditionalGeneration"
    display_name = "InternVL"
    image_separator_tokens = 0  # every image sits between <img> and </img>
    tiny_image = (64, 96)
    # Public GlimpsePrune setting: InternVL2.5-8B (InternLM2.5-7B decoder, 32 layers) K=21.
    glimpse_layers = {32: 21}
    glimpse_score = "logits"
    glimpse_relative_depth = 0.64
    feature_strategy = "default"

    def __init__(self, model):
        self.model = model
        tower = model.model.vision_tower
        if not hasattr(getattr(tower, "encoder", None), "layer"):
            raise NotImplementedError(f"token_prune: internvl with a {type(tower).__name__} vision tower is not "
                                      "supported (an InternViT with encoder.layer is expected)")
        strategy = getattr(model.config, "vision_feature_select_strategy", "default")
        if strategy != "default":
            raise NotImplementedError(f"token_prune: internvl with vision_feature_select_strategy={strategy!r} is "
                                      "not supported (only 'default', which drops the CLS token)")
        if self.shuffle_factor(model.config) is None:
            raise NotImplementedError(f"token_prune: internvl with downsample_ratio={model.config.downsample_ratio} "
                                      "is not supported (1/downsample_ratio must be an integer)")

    # -- structure -------------------------------------------------------------------------
    def clip_layers(self):
        return self.vision_tower.encoder.layer

    @staticmethod
    def shuffle_factor(config) -> int | None:
        """Patches per token side after the pixel shuffle (2 for ``downsample_ratio`` 0.5)."""
        f = 1 / config.downsample_ratio
        return int(round(f)) if abs(f - round(f)) < 1e-6 else None

    @classmethod
    def tile_side(cls, config) -> tuple[int, int]:
        """(tile size in pixels, tokens per tile side ``g``)."""
        vc = config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return size, size // patch // cls.shuffle_factor(config)

    @property
    def tokens_per_side(self) -> int:
        return self.tile_side(self.model.config)[1]

    # -- vision side -----------------------------------------------------------------------
    def default_vision_layers(self):
        """hidden_states indices 24, 17, 11, 5 for a 24-layer tower (the deepest is the one the
        model projects); the same spread for other depths."""
        return super(LlavaAdapter, self).default_vision_layers()

    def arrange(self, hidden, call_args):
        """Tower hidden states [tiles, 1 + p^2, C] -> [tiles * g^2, C]: CLS dropped, each
        ``f x f`` patch group that becomes one token averaged, tokens row-major per tile."""
        f = self.shuffle_factor(self.model.config)
        n, _, C = hidden.shape
        p = int(round((hidden.shape[1] - 1) ** 0.5))
        x = hidden[:, 1:].reshape(n, p // f, f, p // f, f, C).mean((2, 4))
        return x.reshape(-1, C)

    def vision_record(self, feats, n_tiles, call_args):
        # One grid per tile for now (the images' tile counts are in the prompt) plus each token's
        # mean colour, from which resolve_layout recovers every image's canvas.
        g = self.tokens_per_side
        pixels = call_args["pixel_values"]
        colours = torch.nn.functional.adaptive_avg_pool2d(pixels.detach().float(), g)  # [tiles, 3, g, g]
        colours = colours.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1])
        grid = torch.tensor([[g, g]], dtype=torch.long).expand(n_tiles, 2).clone()
        return feats + [colours], grid

    def resolve_layout(self, feats, layout, items, item_kinds, kinds):
        *conds, colours = feats
        g = self.tokens_per_side
        per_tile = g * g
        runs = visual_runs(kinds > 0)
        if sum(runs) != colours.shape[0] or any(n % per_tile for n in runs):
            raise RuntimeError(f"token_prune: the prompt's image runs {runs} do not split the {colours.shape[0]} "
                               f"tokens of the vision pass into tiles of {per_tile}")
        positions, start = [], 0
        for n in runs:
            tiles = n // per_tile
            c = colours[start:start + n].reshape(tiles, g, g, -1)
            if tiles == 1:
                rows = cols = 1
            else:
                rows, cols = canvas_from_colours(c[:-1], c[-1])
            positions.append(image_positions(rows, cols, g))
            start += n
        pos = torch.cat(positions) if positions else torch.zeros(0, 2, dtype=torch.long)
        return conds, (pos.to(colours.device), runs), runs, ["image"] * len(runs)

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def special_ids(cls, config):
        return super().special_ids(config) | {config.image_token_id - 2, config.image_token_id - 1}

    @classmethod
    def canvas(cls, config, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles of a ``height x width`` image."""
        return optimal_canvas(height, width, cls.tile_side(config)[0])

    @classmethod
    def image_tokens(cls, config, height, width):
        g = cls.tile_side(config)[1]
        return g * g * tile_count(*cls.canvas(config, height, width))

    @classmethod
    def prompt_tokens(cls, config, parts):
        img = config.image_token_id
        ids = []
        for kind, value in parts:
            ids += list(value) if kind == "text" else [img - 2] + [img] * value + [img - 1]
        return ids, [0] * len(ids)

    @classmethod
    def _tiles(cls, config, canvas: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[tiles, 3, P, P]: the canvas [3, rows*P, cols*P] cut row-major, then its thumbnail."""
        P = cls.tile_side(config)[0]
        tiles = canvas.reshape(3, rows, P, cols, P).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, P, P)
        if rows * cols > 1:
            thumb = torch.nn.functional.avg_pool2d(canvas[None], (rows, cols))  # area resize to one tile
            tiles = torch.cat([tiles, thumb])
        return tiles

    @classmethod
    def random_pixels(cls, config, images, generator, device, dtype):
        # Each image a random canvas, cut into tiles, with its thumbnail: [all tiles, 3, P, P].
        P = cls.tile_side(config)[0]
        out = []
        for h, w in images:
            rows, cols = cls.canvas(config, h, w)
            canvas = torch.randn(3, rows * P, cols * P, generator=generator, device=generator.device)
            out.append(cls._tiles(config, canvas, rows, cols))
        return dict(pixel_values=torch.cat(out).to(device=device, dtype=dtype))

    @classmethod
    def encode_image(cls, config, image, max_side):
        P = cls.tile_side(config)[0]
        w, h = image.size
        rows, cols = cls.canvas(config, h, w)
        canvas = pil_to_tensor(image.resize((cols * P, rows * P)))
        tiles = cls._tiles(config, canvas, rows, cols)
        if rows * cols > 1:
            tiles[-1] = pil_to_tensor(image.resize((P, P)))
        return dict(pixel_values=tiles), cls.image_tokens(config, h, w)

    @classmethod
    def pixel_rows(cls, inputs, first, count, config=None):
        # The tiles of each image follow from its run of image tokens in the prompt.
        g = cls.tile_side(config)[1]
        tiles = [n // (g * g) for n in visual_runs(inputs["input_ids"] == config.image_token_id)]
        t0 = sum(tiles[:first])
        return dict(pixel_values=inputs["pixel_values"][t0:t0 + sum(tiles[first:first + count])])

    @classmethod
    def head_norms(cls, config):
        return config.text_config.model_type in ("qwen3", "qwen3_moe")

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_layers: int = 4, vocab_size: int = 128,
                    image_size: int = 32, patch_size: int = 4, decoder: str = "qwen2"):
        """A tiny InternVL: an InternViT of 4 layers on 32-px tiles of 4-px patches (8x8 patches,
        4x4 = 16 tokens per tile after the pixel shuffle) and a 6-layer decoder with GQA: Qwen2
        (InternVL3) or, with ``decoder="qwen3"``, Qwen3 with per-head q/k norms (InternVL3.5)."""
        from transformers import InternVLConfig

        extra = {"head_dim": hidden_size // num_attention_heads} if decoder == "qwen3" else {}
        text_config = dict(
            model_type=decoder, **extra, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
            # Larger than the real 0.02 so a random tiny model has peaked, tie-free logits.
            initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **{k: TINY_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                             num_attention_heads=2, image_size=image_size, patch_size=patch_size)
        g = image_size // patch_size // 2
        return InternVLConfig(text_config=text_config, vision_config=vision_config,
                              image_token_id=TINY_IDS["image_token_id"], image_seq_length=g * g, downsample_ratio=0.5)

    @classmethod
    def demo_images(cls):
        return [((64, 96),), ((32, 32), (96, 32))]

    @classmethod
    def vision_units(cls, config, height, width):
        return {"tiles": tile_count(*cls.canvas(config, height, width))}

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        size, _ = cls.tile_side(config)
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return VisionSpec(kind="internvit", depth=vc.num_hidden_layers, width=vc.hidden_size,
                          heads=vc.num_attention_heads, intermediate=vc.intermediate_size, patch=patch,
                          in_channels=vc.num_channels, out=config.text_config.hidden_size, image_size=size,
                          merge=cls.shuffle_factor(config), qkv_bias=bool(vc.attention_bias))


__all__ = ["InternVLAdapter", "optimal_canvas", "canvas_from_colours", "image_positions", "tile_count"]
