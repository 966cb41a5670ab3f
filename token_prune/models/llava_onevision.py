"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower, a two-layer
projector and a Qwen2 decoder with 1D RoPE; LLaVA-NeXT's anyres tiling with a cap on the high-res
grid ("anyres_max_N").

Token layout
------------
An image's tokens are, as in LLaVA-NeXT (see :mod:`.llava`), the base tile's ``side x side`` grid
(SigLIP has no CLS token: every patch is a token), then the high-res tiles stitched into one grid
and unpadded, each row followed by an ``image_newline`` token. What OneVision adds:

* **anyres_max_N.** When the unpadded grid ``h x w`` holds more than about ``N`` tiles' worth of
  tokens (``ratio = sqrt(h w / (N side^2)) > 1.1``), the model shrinks it bilinearly to
  ``int(h // ratio) x int(w // ratio)`` before adding the newlines. The VIP's conditions are
  shrunk the same way (the same ``interpolate`` call on the tower's features), and the positions
  are those of the shrunk grid.
* **Several images in one sample.** When ``batch_num_images`` says a sample has more than one
  image, each of its images is only the base tile followed by one newline.

VIP positions: the base grid on its own grid; the high-res grid on its (unpadded, possibly shrunk)
grid counting from 0; a newline one past its row's last column, with a **zero** condition (no
tower feature belongs to it); each image one VIP attention segment.

Vision conditions: the tower's ``hidden_states`` indexed as for LLaVA (0 = the embeddings); the
default spreads four over the depth, the deepest being the one the model projects
(``vision_feature_layer = -1``): 26, 19, 12, 5 for the 26 SigLIP-so400m layers OneVision keeps. The glimpse map is
raw scaled logits: no GlimpsePrune setting is published for OneVision, and logits are the form of
the public code's setups on Qwen-family decoders (Qwen2.5-VL, and InternVL2.5). K and the ALVTS
rank take the relative defaults (18 of 28 layers and 224 for the 7B).
"""

from __future__ import annotations

import math

import torch

from .llava import LlavaAdapter, LlavaNextAdapter, anyres_tiles, unpad_window

# Token ids of the tiny vocabulary (real checkpoints: <image> 151646, <video> 151647).
TINY_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, image_token_id=3, video_token_id=4)


def anyres_max_size(h: int, w: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The size an unpadded ``h x w`` high-res token grid is shrunk to under ``anyres_max_<max_tiles>``
    (unchanged when it holds at most about ``max_tiles`` tiles of ``side x side`` tokens)."""
    ratio = math.sqrt(h * w / (max_tiles * side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def max_tiles_of(aspect: str) -> int:
    """``N`` of a ``vision_aspect_ratio`` of the form ``anyres_max_N``."""
    if not aspect.startswith("anyres_max_"):
        raise NotImplementedError(f"token_prune: llava_onevision with vision_aspect_ratio={aspect!r} is not "
                                  "supported (only anyres_max_N)")
    return int(aspect[len("anyres_max_"):])


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_type = "llava_onevision"
    hf_model_class = "LlavaOnevisionForConditionalGeneration"
    display_name = "LLaVA-OneVision"
    tiny_image = (112, 112)
    glimpse_layers: dict[int, int] = {}
    glimpse_score = "logits"
    feature_strategy = "full"  # SigLIP has no CLS token
    supports_video = True

    def __init__(self, model):
        super().__init__(model)
        max_tiles_of(model.config.vision_aspect_ratio)

    # -- vision side -----------------------------------------------------------------------
    def default_vision_layers(self):
        """hidden_states indices 26, 19, 12, 5 for a 26-layer tower (the deepest is the one the
        model projects); the same spread for other depths."""
        return super(LlavaAdapter, self).default_vision_layers()

    @classmethod
    def _plan(cls, config, size, patched: bool = True, aspect: str | None = None) -> dict:
        """One image: its high-res tile grid (rows, cols; 0 x 0 when only the base tile is used),
        the unpadding window on the high-res token grid and the (shrunk) size of that grid."""
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        if not patched:
            return dict(rows=0, cols=0, window=None, out=None)
        rows, cols = anyres_tiles(size, config.image_grid_pinpoints, vc.image_size)
        window = unpad_window(size, rows * side, cols * side)
        h, w = window[1] - window[0], window[3] - window[2]
        out = anyres_max_size(h, w, side, max_tiles_of(aspect or config.vision_aspect_ratio))
        return dict(rows=rows, cols=cols, window=window, out=out)

    def _image_plan(self, call_args):
        sizes = call_args.get("image_sizes")
        if sizes is None:
            raise ValueError("token_prune: LLaVA-OneVision needs image_sizes to lay out the image tokens")
        sizes = torch.as_tensor(sizes).tolist()
        counts = call_args.get("batch_num_images")
        # As the model does: a sample with several images gets only their base tiles.
        patched = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        aspect = call_args.get("vision_aspect_ratio")
        return [self._plan(self.model.config, s, p, aspect) for s, p in zip(sizes, patched)]

    def arrange(self, hidden, call_args):
        side = self.tokens_per_side
        C = hidden.shape[-1]
        out, start = [], 0
        for p in self._image_plan(call_args):
            n = 1 + p["rows"] * p["cols"]
            tiles = hidden[start:start + n]
            start += n
            out.append(tiles[0])  # the base tile, row-major
            if n == 1:
                out.append(tiles.new_zeros(1, C))  # its newline: a zero condition
                continue
            grid = tiles[1:].view(p["rows"], p["cols"], side, side, C).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(p["rows"] * side, p["cols"] * side, C)
            r0, r1, c0, c1 = p["window"]
            grid = grid[r0:r1, c0:c1]
            if tuple(grid.shape[:2]) != p["out"]:  # anyres_max: shrunk as the model shrinks its features
                grid = torch.nn.functional.interpolate(grid.permute(2, 0, 1)[None], list(p["out"]), mode="bilinear")
                grid = grid[0].permute(1, 2, 0)
            newline = grid.new_zeros(grid.shape[0], 1, C)
            out.append(torch.cat([grid, newline], 1).reshape(-1, C))
        if start != hidden.shape[0]:
            raise RuntimeError(f"token_prune: the vision tower saw {hidden.shape[0]} tiles but image_sizes imply {start}")
        return torch.cat(out)

    def layout(self, n_tiles, call_args):
        side = self.tokens_per_side
        base = torch.stack([torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)], 1)
        pos, lengths = [], []
        for p in self._image_plan(call_args):
            if p["rows"] * p["cols"] == 0:
                grid = torch.tensor([[side - 1, side]])
            else:
                h, w = p["out"]
                # w + 1 columns per row: the last is the newline token, at column w.
                grid = torch.stack([torch.arange(h).repeat_interleave(w + 1), torch.arange(w + 1).repeat(h)], 1)
            pos += [base, grid]
            lengths.append(side * side + grid.shape[0])
        return torch.cat(pos).long(), lengths

    # -- video ------------------------------------------------------------------------------
    def vision_entry_points(self):
        return {"get_image_features": self.image_record, "get_video_features": self.video_record}

    @staticmethod
    def pooled_side(config) -> int:
        """Tokens per side of a video frame: the tile's token grid halved (rounded up) by the model's
        bilinear pooling."""
        vc = config.vision_config
        return math.ceil(vc.image_size // vc.patch_size / 2)

    def video_record(self, hidden, n_frames, call_args):
        """A video pass: per video, its frames' features pooled as the model pools them (the same
        bilinear ``interpolate`` to ``ceil(side / 2)`` per side), frames one after another, then a
        zero condition for the video's closing newline; one VIP segment per frame (the newline
        closes the last one, one past its last row's last column); one keep-rule item per video."""
        # [videos, frames, 3, size, size]; the argument is named `pixel_values` in transformers 5.17
        pixels = call_args.get("pixel_values_videos")
        videos, frames = (pixels if pixels is not None else call_args["pixel_values"]).shape[:2]
        side, p = self.tokens_per_side, self.pooled_side(self.model.config)
        feats = []
        for h in hidden:
            C = h.shape[-1]
            x = h.reshape(n_frames, side, side, C).permute(0, 3, 1, 2)
            x = torch.nn.functional.interpolate(x, size=[p, p], mode="bilinear").permute(0, 2, 3, 1)
            x = x.reshape(videos, frames * p * p, C)
            feats.append(torch.cat([x, x.new_zeros(videos, 1, C)], 1).reshape(-1, C))
        frame = torch.stack([torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)], 1)
        last = torch.cat([frame, torch.tensor([[p - 1, p]])])
        positions = torch.cat(([frame] * (frames - 1) + [last]) * videos).long()
        lengths = ([p * p] * (frames - 1) + [p * p + 1]) * videos
        return feats, (positions, lengths), [frames * p * p + 1] * videos, [frames] * videos

    @classmethod
    def video_tokens(cls, config, frames: int, height: int, width: int) -> list[int]:
        """Visual tokens of each frame of a ``frames``-frame video (each pooled to a grid; the
        video's one newline counted with the last frame); the frame size does not matter, the
        processor resizes every frame to one tile."""
        p = cls.pooled_side(config)
        return [p * p] * (frames - 1) + [p * p + 1]

    @classmethod
    def random_video_pixels(cls, config, videos, generator, device, dtype):
        """``pixel_values_videos`` [videos, frames, 3, size, size] for random videos of the given
        (frames, height, width); every video of a batch has the same number of frames, as the
        video processor samples them."""
        frames = {f for f, _, _ in videos}
        if len(frames) != 1:
            raise ValueError(f"the videos of one batch need the same number of frames, got {sorted(frames)}")
        size = config.vision_config.image_size
        x = torch.randn(len(videos), frames.pop(), 3, size, size, generator=generator, device=generator.device)
        return dict(pixel_values_videos=x.to(device=device, dtype=dtype))

    @classmethod
    def video_rows(cls, inputs, first, count):
        """The video inputs of videos ``first .. first+count-1`` (prompt order) of a batch."""
        return dict(pixel_values_videos=inputs["pixel_values_videos"][first:first + count])

    @classmethod
    def video_sizes(cls, config, inputs):
        """Visual tokens of each video of a batch's inputs, in prompt order."""
        x = inputs.get("pixel_values_videos")
        return [] if x is None else [x.shape[1] * cls.pooled_side(config) ** 2 + 1] * x.shape[0]

    @classmethod
    def prompt_tokens(cls, config, parts):
        # <bos>, the text, each image as a run of <image> tokens, each video as a run of <video> tokens.
        bos = config.text_config.bos_token_id
        ids = [bos if bos is not None else 1]
        for kind, value in parts:
            if kind == "text":
                ids += list(value)
            elif kind == "image":
                ids += [config.image_token_id] * value
            else:
                ids += [config.video_token_id] * sum(value)
        types = [0] * len(ids)
        return ids, types

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def image_tokens(cls, config, height, width):
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        h, w = cls._plan(config, (height, width))["out"]
        return side * side + h * (w + 1)

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_layers: int = 4, vocab_size: int = 128,
                    image_size: int = 56, patch_size: int = 14, vision_aspect_ratio: str = "anyres_max_2",
                    projector_hidden_act: str = "gelu"):
        """A tiny LLaVA-OneVision: a 4-layer SigLIP on 56-px tiles of 14-px patches (4x4 tokens),
        anyres over canvases of 1..3 x 1..3 tiles (OneVision's 384-px pinpoints scaled to 56 px), a
        cap of 2 tiles (``anyres_max_2``, so a 2x2 canvas is shrunk) and a 6-layer Qwen2 with GQA."""
        from transformers import LlavaOnevisionConfig

        text_config = dict(
            model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
            # Larger than the real 0.02 so a random tiny model has peaked, tie-free logits.
            initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **{k: TINY_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        vision_config = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                             num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                             patch_size=patch_size)
        pins = [[image_size * r, image_size * c] for r in range(1, 4) for c in range(1, 4)]
        return LlavaOnevisionConfig(text_config=text_config, vision_config=vision_config,
                                    image_token_index=TINY_IDS["image_token_id"],
                                    video_token_index=TINY_IDS["video_token_id"], image_grid_pinpoints=pins,
                                    vision_aspect_ratio=vision_aspect_ratio, vision_feature_layer=-1,
                                    vision_feature_select_strategy="full", projector_hidden_act=projector_hidden_act)

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        pins = tuple(tuple(p) for p in config.image_grid_pinpoints)
        return VisionSpec(kind="siglip", depth=vc.num_hidden_layers, width=vc.hidden_size, heads=vc.num_attention_heads,
                          intermediate=vc.intermediate_size, patch=vc.patch_size, in_channels=vc.num_channels,
                          out=config.text_config.hidden_size, image_size=vc.image_size, grid_pinpoints=pins,
                          head=bool(getattr(vc, "vision_use_head", True)))

    @classmethod
    def demo_images(cls):
        return [((112, 112),), ((60, 150),)]


__all__ = ["LlavaOnevisionAdapter", "anyres_max_size", "max_tiles_of"]
