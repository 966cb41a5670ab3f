"""The cost model's vision towers: their shapes (:class:`VisionSpec`) and the cost of encoding one
image (:func:`vision_cost`), for every family's tower. Part of :mod:`token_prune.costmodel`, which
re-exports both; split off to keep each module readable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .costmodel import Arch, Cost


@dataclass(frozen=True)
class VisionSpec:
    """Vision tower sizes. ``kind``: ``qwen_vit`` (windowed ViT + 2x2 merger), ``clip`` (CLS token,
    projector ``w -> H -> H``), ``siglip`` (no CLS; an attention-pooling head when ``head``) or
    ``internvit`` (CLS, layer-scale vectors, pixel shuffle of ``merge x merge`` patches into one
    token, projector ``LayerNorm, merge^2 w -> H -> H``)."""

    kind: str
    depth: int
    width: int
    heads: int
    intermediate: int
    patch: int
    in_channels: int = 3
    out: int = 0  # LLM hidden size the tower (plus projector) produces
    # qwen_vit
    temporal_patch: int = 2
    merge: int = 2
    window: int = 112  # pixels
    fullatt: tuple[int, ...] = ()
    #: block MLP: ``swiglu`` (gate, up, down) or ``gelu`` (fc1, fc2); norms ``rms`` or ``layer``
    mlp: str = "swiglu"
    norm: str = "rms"
    #: the patch embedding has a bias; learned position embeddings (rows); extra 2x2 mergers
    #: whose outputs feed the decoder's deepstack (Qwen3-VL, normalised after the merge)
    patch_bias: bool = False
    pos_embed: int = 0
    deepstack_mergers: int = 0
    # clip, siglip, internvit
    image_size: int = 336
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    qkv_bias: bool = True
    head: bool = False

    @property
    def cls_token(self) -> bool:
        return self.kind in ("clip", "internvit")

    @property
    def shuffle(self) -> int:
        """Patches per token side after the tower (InternViT's pixel shuffle; 1 otherwise)."""
        return self.merge if self.kind == "internvit" else 1

    def block_params(self) -> int:
        w, I = self.width, self.intermediate
        if self.kind == "qwen_vit":  # qkv + proj with biases, the MLP with biases, two norms
            mlp = 3 * w * I + 2 * I + w if self.mlp == "swiglu" else 2 * w * I + I + w
            return (3 * w * w + 3 * w) + (w * w + w) + mlp + (2 if self.norm == "rms" else 4) * w
        # q,k,v,o; fc1, fc2; two LayerNorms (InternViT: two layer-scale vectors too)
        attn = 4 * w * w + (3 * w if self.qkv_bias else 0) + w
        return attn + (2 * w * I + I + w) + 4 * w + (2 * w if self.kind == "internvit" else 0)

    def params(self) -> int:
        w = self.width
        if self.kind == "qwen_vit":
            patch = self.in_channels * self.temporal_patch * self.patch**2 * w + (w if self.patch_bias else 0)
            m = w * self.merge**2
            norm = 1 if self.norm == "rms" else 2  # LayerNorm: weight and bias
            mlp = m * m + m + m * self.out + self.out
            merger = norm * w + mlp + self.deepstack_mergers * (norm * m + mlp)
            return patch + self.pos_embed * w + self.depth * self.block_params() + merger
        side = self.image_size // self.patch
        cls = 1 if self.cls_token else 0
        conv = self.in_channels * self.patch**2 * w + (0 if self.kind == "clip" else w)  # CLIP's has no bias
        emb = conv + (side * side + cls) * w + cls * w  # position embeddings, CLS embedding
        m = w * self.shuffle**2
        projector = m * self.out + self.out + self.out * self.out + self.out
        if self.kind == "clip":  # pre- and post-LayerNorm
            return emb + 2 * w + self.depth * self.block_params() + 2 * w + projector
        if self.kind == "siglip":  # post-LayerNorm, attention-pooling head
            head = (w + 4 * w * w + 4 * w + 2 * w + 2 * w * self.intermediate + self.intermediate + w) if self.head else 0
            return emb + self.depth * self.block_params() + 2 * w + head + projector
        return emb + self.depth * self.block_params() + 2 * m + projector  # internvit: projector LayerNorm



def _window_sizes(gh: int, gw: int, win: int) -> list[int]:
    """Merged tokens per window of a ``gh x gw`` merged grid cut into ``win x win`` windows."""
    sizes = []
    for r0 in range(0, gh, win):
        for c0 in range(0, gw, win):
            sizes.append(min(win, gh - r0) * min(win, gw - c0))
    return sizes


def vision_cost(arch: Arch, image_hw: tuple[int, int], batch: int = 1, tiles: int | None = None,
                frame_groups: int = 1) -> dict[str, Cost]:
    """Vision tower (+ merger / projector) for ``batch`` images of ``image_hw`` pixels, or for
    ``batch`` videos of ``frame_groups`` temporal groups of that size (the Qwen ViTs attend within
    each group, so a video costs its groups' images)."""
    from .costmodel import Cost

    batch = batch * frame_groups
    v, b = arch.vision, arch.dtype_bytes
    w, I = v.width, v.intermediate
    if v.kind == "qwen_vit":
        h, wd = image_hw
        gh, gw = h // v.patch, wd // v.patch
        P = gh * gw
        patch_dim = v.in_channels * v.temporal_patch * v.patch**2
        embed = Cost(proj_flops=2.0 * P * patch_dim * w, bytes=patch_dim * w * b + P * (patch_dim + w) * b)
        mg = v.merge
        win = v.window // mg // v.patch
        window_pairs = sum((s * mg * mg) ** 2 for s in _window_sizes(gh // mg, gw // mg, win))
        full_blocks = sum(1 for i in v.fullatt if 0 <= i < v.depth)
        proj = 2.0 * P * 4 * w * w
        mats = 3 if v.mlp == "swiglu" else 2
        mlp = 2.0 * P * mats * w * I
        act = 2.0 * P * b * (6 * w + mats * I)
        blocks = Cost(
            proj_flops=v.depth * proj,
            mlp_flops=v.depth * mlp,
            attn_flops=4.0 * w * (full_blocks * P * P + (v.depth - full_blocks) * window_pairs),
            bytes=v.depth * (v.block_params() * b + act),
        )
        m = w * mg * mg
        Pm = P // (mg * mg)
        n_merge = 1 + v.deepstack_mergers
        merger = Cost(
            mlp_flops=n_merge * 2.0 * Pm * (m * m + m * v.out),
            bytes=n_merge * ((m * m + m * v.out) * b + 2.0 * Pm * (2 * m + v.out) * b),
        )
        stages = {"embed": embed, "blocks": blocks, "merger": merger}
    else:
        side = v.image_size // v.patch
        T = side * side + (1 if v.cls_token else 0)
        t = tiles or 1
        embed = Cost(
            proj_flops=2.0 * t * side * side * v.in_channels * v.patch**2 * w, bytes=v.in_channels * v.patch**2 * w * b
        )
        act = 2.0 * T * b * (6 * w + 2 * I)
        blocks = Cost(
            proj_flops=v.depth * t * 2.0 * T * 4 * w * w,
            mlp_flops=v.depth * t * 2.0 * T * 2 * w * I,
            attn_flops=v.depth * t * 4.0 * w * T * T,
            bytes=v.depth * (v.block_params() * b + t * act),
        )
        H, m = v.out, w * v.shuffle**2
        n = side * side // v.shuffle**2  # tokens the projector maps
        projector = Cost(
            mlp_flops=t * 2.0 * n * (m * H + H * H), bytes=(m * H + H * H) * b + t * n * (m + 2 * H) * b
        )
        stages = {"embed": embed, "blocks": blocks, "projector": projector}
    # Weights are read once for the batch; everything else scales with it.
    out = {}
    for name, c in stages.items():
        out[name] = Cost(
            c.proj_flops * batch, c.attn_flops * batch, c.mlp_flops * batch, c.other_flops * batch, c.bytes * batch
        )
    return out


__all__ = ["VisionSpec", "vision_cost"]
