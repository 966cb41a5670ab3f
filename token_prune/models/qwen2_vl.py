"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): M-RoPE positions, a plain ViT with 2x2 merging,
images and videos.

Qwen2-VL's layout is the one Qwen2.5-VL and Qwen3-VL build on (their adapters derive from this
one): the visual tokens of an image are its merged 2x2 patch groups, row-major; a video is
``t`` temporal groups (two frames each) of such grids, one after another; ``mm_token_type_ids``
marks image (1) and video (2) tokens for the M-RoPE positions.

VIP vision conditions: the outputs of four ViT blocks spread over the depth, deep to shallow
(``d*4/4-1, d*3/4-1, d*2/4-1, d/4-1``: blocks 31, 23, 15, 7 of Qwen2-VL-7B's 32, 1280 wide),
each mean-pooled over the 2x2 merge group of a visual token.

Videos: every temporal group is one VIP attention segment on its own 2D grid (rows, cols of the
merged tokens, from 0 per group), so the VIP's positions mean the same for a frame as for an
image; the keep rule (threshold, cap, floor, ``keep_ratio``) applies per video, over all its
groups, so that a cap lets the kept budget move between frames.
"""

from __future__ import annotations

import torch

from .. import hf
from ..instance_patch import forward_hook, forward_pre_hook
from .base import ModelAdapter, pil_to_tensor

# Token ids of the tiny Qwen-VL vocabularies. Real checkpoints use 151643.. for these; the tiny
# vocabulary keeps them small so the embedding table stays tiny too.
TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, vision_start_token_id=3, vision_end_token_id=4,
                image_token_id=5, video_token_id=6)


def segment_grids(grid_thw: torch.Tensor, merge: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """The VIP segments and items of one vision pass.

    Args:
        grid_thw: [n, 3] (t, h, w) in patches of each image or video of the pass.
        merge: spatial merge size (2).

    Returns:
        (grids [sum t, 2] (rows, cols) of merged tokens, one per temporal group; tokens per item;
        segments per item).
    """
    g = grid_thw.long()
    rows, cols = g[:, 1] // merge, g[:, 2] // merge
    grids = torch.stack([rows, cols], 1).repeat_interleave(g[:, 0], 0)
    return grids, (g[:, 0] * rows * cols).tolist(), g[:, 0].tolist()


class Qwen2VLAdapter(ModelAdapter):
    model_type = "qwen2_vl"
    hf_model_class = "Qwen2VLForConditionalGeneration"
    display_name = "Qwen2-VL"
    supports_video = True
    tiny_image = (128, 128)
    #: text tokens a family puts before each temporal group of a video (Qwen3-VL: its timestamp)
    frame_prefix_tokens = 0

    @property
    def visual(self):
        return self.model.model.visual

    def rotary(self, hidden, pos):
        return hf.rotary(self.lm, hidden, pos)

    def split_positions(self, position_ids, batch, seq, device):
        if position_ids is None:
            pos = torch.arange(seq, device=device).view(1, 1, -1).expand(3, batch, -1)
            return pos, None
        if position_ids.ndim == 2:
            return position_ids[None].expand(3, -1, -1), None
        if position_ids.shape[0] == 4:
            return position_ids[1:], position_ids[0]
        return position_ids, None

    def text_positions(self, position_ids, batch, seq, device):
        # Without the text row, generate continuing from a cache passes [1, B, S] M-RoPE positions of
        # text tokens (Qwen3.5 does): the text position shifted by the cached rope delta.
        pos, text = self.split_positions(position_ids, batch, seq, device)
        if text is not None:
            return text
        deltas = hf.rope_deltas(self.outer)
        if deltas is None or position_ids is None or position_ids.ndim != 3:
            return pos[0]
        return pos[0] - deltas.to(pos.device)

    def vision_width(self):
        return self.model.config.vision_config.embed_dim

    def vision_depth(self):
        return self.model.config.vision_config.depth

    def vit_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """[merged tokens] natural index of the merged token at each slot of the ViT's block
        outputs, or None when the ViT keeps the natural (row-major per group) order."""
        return None

    def install_vision_hooks(self, runtime, layers):
        merge = self.model.config.vision_config.spatial_merge_size
        unit = merge * merge
        captured: dict[int, torch.Tensor] = {}
        grid: list = [None]
        blocks = self.visual.blocks
        for blk in layers:
            if not 0 <= blk < len(blocks):
                raise ValueError(f"vision layer {blk} outside the ViT (0..{len(blocks) - 1})")

        def pre(module, args, kwargs):
            grid[0] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            captured.clear()

        def make_block_hook(idx):
            def hook(module, args, output):
                captured[idx] = output[0] if isinstance(output, tuple) else output
            return hook

        def post(module, args, kwargs, output):
            # Runs for every pass of the vision tower, inside a model forward or not: since
            # transformers 5.2x, generate() encodes the images before its first forward call.
            if grid[0] is None or len(captured) != len(layers):
                return
            order = self.vit_order(grid[0])
            inverse = None if order is None else torch.argsort(order)
            feats = []
            for blk in layers:
                h = captured[blk]
                pooled = h.reshape(h.shape[0] // unit, unit, -1).mean(1)
                feats.append(pooled if inverse is None else pooled[inverse])
            grids, items, segments = segment_grids(grid[0], merge)
            runtime.add_vision_capture(feats, grids, items, segments)
            captured.clear()

        hooks = [forward_pre_hook(self.visual, pre, with_kwargs=True)]
        for blk in dict.fromkeys(layers):
            hooks.append(forward_hook(blocks[blk], make_block_hook(blk)))
        hooks.append(forward_hook(self.visual, post, with_kwargs=True))
        return hooks

    def decode_positions(self, runtime, kwargs):
        # With a mask, HF derives decode positions from the full-length mask, which is right.
        # Without one it counts cache entries, which pruning shrank: continue the unpruned count.
        if kwargs.get("attention_mask") is not None:
            return None
        cache = hf.get_cache(kwargs)
        ids = kwargs.get("input_ids")
        emb = kwargs.get("inputs_embeds")
        q = (ids if ids is not None else emb).shape[1]
        b = (ids if ids is not None else emb).shape[0]
        start = runtime.pruned.next_position(cache)
        dev = (ids if ids is not None else emb).device
        text = torch.arange(start, start + q, device=dev).view(1, -1).expand(b, -1)
        deltas = hf.rope_deltas(self.outer)
        pos = text if deltas is None else text + deltas.to(dev)
        return torch.cat([text[None], pos[None].expand(3, -1, -1)], 0)

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def _unit(cls, config) -> int:
        vc = config.vision_config
        return vc.patch_size * vc.spatial_merge_size

    @classmethod
    def _check_size(cls, config, height: int, width: int) -> None:
        unit = cls._unit(config)
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} must be a multiple of {unit} px")

    @classmethod
    def image_tokens(cls, config, height, width):
        cls._check_size(config, height, width)
        unit = cls._unit(config)
        return (height // unit) * (width // unit)

    @classmethod
    def video_groups(cls, config, frames: int) -> int:
        """Temporal groups of a ``frames``-frame video (frames in multiples of the temporal patch)."""
        T = config.vision_config.temporal_patch_size
        if frames < 1 or frames % T:
            raise ValueError(f"a video needs a positive multiple of {T} frames, got {frames}")
        return frames // T

    @classmethod
    def video_tokens(cls, config, frames: int, height: int, width: int) -> list[int]:
        """Visual tokens of each temporal group of a ``frames x height x width`` video."""
        return [cls.image_tokens(config, height, width)] * cls.video_groups(config, frames)

    @classmethod
    def frame_prefix(cls, config, group: int) -> list[int]:
        """Text ids the prompt puts before temporal group ``group`` of a video (none here)."""
        return []

    @classmethod
    def prompt_tokens(cls, config, parts):
        """Token ids and ``mm_token_type_ids`` (0 text, 1 image, 2 video); ``parts`` items are
        ``("text", ids)``, ``("image", n_tokens)`` and ``("video", tokens per temporal group)``."""
        ids, types = [], []
        vs, ve = config.vision_start_token_id, config.vision_end_token_id
        for kind, value in parts:
            if kind == "text":
                ids += list(value)
                types += [0] * len(value)
            elif kind == "image":  # <vision_start> <image>*n <vision_end>
                ids += [vs] + [config.image_token_id] * value + [ve]
                types += [0] + [1] * value + [0]
            elif cls.frame_prefix_tokens == 0:  # <vision_start> <video>*(all groups) <vision_end>
                n = sum(value)
                ids += [vs] + [config.video_token_id] * n + [ve]
                types += [0] + [2] * n + [0]
            else:  # <vision_start> (stamp <vision_start> <video>*n <vision_end>)* <vision_end>
                ids.append(vs)
                types.append(0)
                for g, n in enumerate(value):
                    stamp = cls.frame_prefix(config, g)
                    ids += stamp + [vs] + [config.video_token_id] * n + [ve]
                    types += [0] * (len(stamp) + 1) + [2] * n + [0]
                ids.append(ve)
                types.append(0)
        return ids, types

    @classmethod
    def uses_token_types(cls):
        return True

    @classmethod
    def _patches(cls, config, grids, generator, device, dtype) -> torch.Tensor:
        vc = config.vision_config
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        n = sum(t * gh * gw for t, gh, gw in grids)
        return torch.randn(n, patch_dim, generator=generator, device=generator.device).to(device=device, dtype=dtype)

    @classmethod
    def random_pixels(cls, config, images, generator, device, dtype):
        # Patches [sum over images of h*w / patch^2, C*T*P*P], as the image processor flattens them.
        vc = config.vision_config
        grids = []
        for h, w in images:
            cls._check_size(config, h, w)
            grids.append([1, h // vc.patch_size, w // vc.patch_size])
        pixels = cls._patches(config, grids, generator, device, dtype)
        return dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids, dtype=torch.long, device=device))

    @classmethod
    def random_video_pixels(cls, config, videos: list[tuple[int, int, int]], generator, device, dtype) -> dict:
        """Video inputs (``pixel_values_videos``, ``video_grid_thw``) for random videos of the given
        (frames, height, width), in prompt order, laid out as the video processor lays them out."""
        vc = config.vision_config
        grids = []
        for f, h, w in videos:
            cls._check_size(config, h, w)
            grids.append([cls.video_groups(config, f), h // vc.patch_size, w // vc.patch_size])
        pixels = cls._patches(config, grids, generator, device, dtype)
        return dict(pixel_values_videos=pixels, video_grid_thw=torch.tensor(grids, dtype=torch.long, device=device))

    @classmethod
    def encode_image(cls, config, image, max_side):
        vc = config.vision_config
        P, m, T = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        unit = P * m
        w, h = image.size
        scale = min(1.0, max_side / max(w, h))
        W = max(unit, int(round(w * scale / unit)) * unit)
        H = max(unit, int(round(h * scale / unit)) * unit)
        x = pil_to_tensor(image.resize((W, H)))  # [C, H, W]
        C = x.shape[0]
        gh, gw = H // P, W // P
        frames = x[None].expand(T, C, H, W)  # one image = the frame repeated over the temporal patch
        p = frames.reshape(1, T, C, gh // m, m, P, gw // m, m, P)
        p = p.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, C * T * P * P)
        return dict(pixel_values=p, image_grid_thw=torch.tensor([[1, gh, gw]])), gh * gw // (m * m)

    @classmethod
    def _rows(cls, inputs, key, grid_key, first, count) -> dict:
        grid = inputs[grid_key]
        patches = grid.prod(-1).tolist()
        p0 = sum(patches[:first])
        return {key: inputs[key][p0:p0 + sum(patches[first:first + count])], grid_key: grid[first:first + count]}

    @classmethod
    def pixel_rows(cls, inputs, first, count, config=None):
        return cls._rows(inputs, "pixel_values", "image_grid_thw", first, count)

    @classmethod
    def video_rows(cls, inputs: dict, first: int, count: int) -> dict:
        """The video inputs of videos ``first .. first+count-1`` (prompt order) of a batch."""
        out = cls._rows(inputs, "pixel_values_videos", "video_grid_thw", first, count)
        if inputs.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][first:first + count]
        return out

    @classmethod
    def video_sizes(cls, config, inputs: dict) -> list[int]:
        """Visual tokens of each video of a batch's inputs, in prompt order."""
        grid = inputs.get("video_grid_thw")
        m = config.vision_config.spatial_merge_size
        return [] if grid is None else (grid.prod(-1) // (m * m)).tolist()

    @classmethod
    def rope_config(cls, hidden_size: int, num_heads: int) -> dict:
        """The decoder's M-RoPE: rotary frequencies split 2:3:3 over the t/h/w axes."""
        half = (hidden_size // num_heads) // 2
        hw = half * 3 // 8
        return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]}

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_depth: int = 4, vocab_size: int = 128):
        """A tiny Qwen2-VL: 6 decoder layers, 4 ViT blocks 32 wide, 8x8-pixel patches, 2x2 merging."""
        from transformers import Qwen2VLConfig

        # initializer_range 0.2: larger than the real 0.02, so a random tiny model has peaked,
        # tie-free logits.
        text_config = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
            initializer_range=0.2, rope_parameters=cls.rope_config(hidden_size, num_attention_heads),
            **{k: TINY_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        vision_config = dict(depth=vision_depth, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2,
                             in_channels=3, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        rest = {k: v for k, v in TINY_IDS.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **rest)

    @classmethod
    def vision_units(cls, config, height, width):
        vc = config.vision_config
        cls._check_size(config, height, width)
        return {"vision_patches": (height // vc.patch_size) * (width // vc.patch_size)}

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        # Full attention in every block: a window as large as any image.
        return VisionSpec(kind="qwen_vit", depth=vc.depth, width=vc.embed_dim, heads=vc.num_heads,
                          intermediate=vc.embed_dim * vc.mlp_ratio, patch=vc.patch_size, in_channels=vc.in_channels,
                          out=vc.hidden_size, temporal_patch=vc.temporal_patch_size, merge=vc.spatial_merge_size,
                          window=1 << 20, fullatt=tuple(range(vc.depth)), mlp="gelu", norm="layer")

    @classmethod
    def qkv_bias(cls, config):
        return True
