"""GlimpsePrune's learned parts: glimpse embeddings and the visual token
importance predictor (VIP).

This module is self-contained (no imports from the rest of ``token_prune``,
except a lazy, optional one of the fused CUDA attention kernel) so it can be
used, tested and serialised on its own. Submodule names follow the
public GlimpsePrune checkpoint so state dicts are interchangeable with it:

* ``GlimpseEmbedding`` - one learned vector per decoder layer, passed through
  ``Linear(H, H)`` and RMSNorm (public names ``learnable_embeddings``,
  ``le_proj``, ``le_norm``).
* ``VIP`` - turns the glimpse attention map ``[N, num_heads]`` of layer K plus
  a few intermediate ViT features into one keep logit per visual token
  (public name ``attn_fuser``).
* ``GlimpseModules`` - both of the above plus their ``GlimpseConfig``, with
  save/load in this package's format and an importer for the public format.

Shapes: ``N`` is the total number of visual tokens of all images in a call
(after the vision merger), ``H`` the LLM hidden size.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GlimpseConfig",
    "RMSNorm",
    "VIP",
    "GlimpseEmbedding",
    "GlimpseModules",
    "rope_2d_cos_sin",
    "rope_2d_cos_sin_from_positions",
    "positions_from_grid",
    "apply_rope",
    "cu_seqlens_from_grid",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

FORMAT_NAME = "token_prune.glimpse"
FORMAT_VERSION = 1
CONFIG_FILE = "glimpse_config.json"
WEIGHTS_FILE = "model.safetensors"
PUBLIC_CONFIG_FILE = "config.json"
PUBLIC_WEIGHTS_FILE = "new_modules_gp.pt"

_GLIMPSE_SCORES = ("logits", "log_softmax")


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    # bool is an int subclass; a JSON `true` where a count belongs is a bug.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x))


@dataclass
class GlimpseConfig:
    """Sizes of the glimpse embeddings and the VIP, and where they attach.

    Fields:
        llm_hidden_size: H, width of the LLM hidden state (glimpse vector size).
        llm_num_layers: number of decoder layers = number of glimpse vectors.
        llm_num_heads: attention heads of the LLM; input width of the VIP
            (the glimpse attention map has one column per head).
        llm_rms_norm_eps: eps of the glimpse vectors' RMSNorm.
        vision_width: width of the ViT features used as conditions
            (1280 for Qwen2.5-VL, 1024 for CLIP-L).
        vision_layers: ViT block indices giving the conditions, deep to
            shallow; the m-th feeds VIP block m.
        layer: K, the decoder layer whose glimpse attention the VIP reads.
        glimpse_score: "logits" (raw scaled q.k, Qwen) or "log_softmax" (LLaVA).
        hidden_size, cond_size, num_heads, mlp_ratio: VIP widths.
        rope_theta: base of the VIP's 2D RoPE.
        norm_eps: eps of the VIP's RMSNorms.
        model_type: informational; the wrapped LVLM's model_type.
    """

    llm_hidden_size: int
    llm_num_layers: int
    llm_num_heads: int
    vision_width: int
    vision_layers: List[int]
    layer: int
    llm_rms_norm_eps: float = 1e-6
    glimpse_score: str = "logits"
    hidden_size: int = 256
    cond_size: int = 512
    num_heads: int = 4
    mlp_ratio: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    model_type: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, tuple):
            self.vision_layers = list(self.vision_layers)
        self.validate()

    @property
    def num_conditions(self) -> int:
        """Number of VIP blocks (one per ViT condition)."""
        return len(self.vision_layers)

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of the VIP's queries/keys: (hidden + cond) / heads."""
        return (self.hidden_size + self.cond_size) // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """Per-head width of the VIP's values: hidden / heads."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ("llm_hidden_size", "llm_num_layers", "llm_num_heads",
                     "vision_width", "hidden_size", "cond_size", "num_heads",
                     "mlp_ratio"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(
                    f"GlimpseConfig.{name} must be a positive int, got {v!r}")
        for name in ("llm_rms_norm_eps", "norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ValueError(
                    f"GlimpseConfig.{name} must be a positive finite number, "
                    f"got {v!r}")
        if not _is_int(self.layer) or not 0 <= self.layer < self.llm_num_layers:
            raise ValueError(
                f"GlimpseConfig.layer must be an int in [0, llm_num_layers="
                f"{self.llm_num_layers}), got {self.layer!r}")
        if (not isinstance(self.vision_layers, list) or not self.vision_layers
                or not all(_is_int(v) and v >= 0 for v in self.vision_layers)):
            raise ValueError(
                "GlimpseConfig.vision_layers must be a non-empty list of "
                f"non-negative ints, got {self.vision_layers!r}")
        if self.glimpse_score not in _GLIMPSE_SCORES:
            raise ValueError(
                f"GlimpseConfig.glimpse_score must be one of {_GLIMPSE_SCORES}, "
                f"got {self.glimpse_score!r}")
        if not isinstance(self.model_type, str):
            raise ValueError(
                f"GlimpseConfig.model_type must be a str, got {self.model_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"GlimpseConfig.hidden_size ({self.hidden_size}) must be "
                f"divisible by num_heads ({self.num_heads})")
        qk = self.hidden_size + self.cond_size
        if qk % self.num_heads:
            raise ValueError(
                f"GlimpseConfig.hidden_size + cond_size ({qk}) must be "
                f"divisible by num_heads ({self.num_heads})")
        # 2D RoPE splits each q/k head in half (rotate_half), and each half in
        # two (row, col) frequency sets, so the head dim must split in four.
        if self.qk_head_dim % 4:
            raise ValueError(
                f"GlimpseConfig: q/k head dim (hidden_size + cond_size) / "
                f"num_heads = {self.qk_head_dim} must be divisible by 4 for 2D RoPE")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict of all fields."""
        d = asdict(self)
        d["vision_layers"] = list(d["vision_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GlimpseConfig":
        """Inverse of ``to_dict``; rejects unknown and missing required keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"GlimpseConfig.from_dict expects a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GlimpseConfig: unknown field(s) {unknown}")
        required = [f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"GlimpseConfig: missing required field(s) {missing}")
        kw = dict(d)
        if isinstance(kw.get("vision_layers"), tuple):
            kw["vision_layers"] = list(kw["vision_layers"])
        return cls(**kw)


# --------------------------------------------------------------------------
# Position helpers (also the reference for the fused kernel)
# --------------------------------------------------------------------------


def _grid_list(grid_hw: Union[torch.Tensor, Sequence[Sequence[int]]]) -> List[Tuple[int, int]]:
    if isinstance(grid_hw, torch.Tensor):
        if grid_hw.dim() != 2 or grid_hw.shape[1] != 2:
            raise ValueError(f"grid_hw must have shape [n_images, 2], got {tuple(grid_hw.shape)}")
        if grid_hw.is_floating_point() or grid_hw.is_complex():
            raise ValueError(f"grid_hw must be an integer tensor, got {grid_hw.dtype}")
        rows = grid_hw.tolist()
    else:
        rows = [list(r) for r in grid_hw]
    out = []
    for r in rows:
        if len(r) != 2 or not all(_is_int(v) and v >= 1 for v in r):
            raise ValueError(f"grid_hw rows must be (rows >= 1, cols >= 1), got {r!r}")
        out.append((int(r[0]), int(r[1])))
    return out


def cu_seqlens_from_grid(grid_hw: torch.Tensor) -> torch.Tensor:
    """Cumulative token offsets of the images.

    Args:
        grid_hw: int [n_images, 2], (rows, cols) of each image's token grid.
    Returns:
        int32 [n_images + 1] on grid_hw's device: 0, n_0, n_0 + n_1, ...
        (image i owns tokens cu[i]:cu[i+1]).
    """
    if grid_hw.dim() != 2 or grid_hw.shape[1] != 2:
        raise ValueError(f"grid_hw must have shape [n_images, 2], got {tuple(grid_hw.shape)}")
    counts = grid_hw[:, 0].long() * grid_hw[:, 1].long()
    return F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)


def rope_2d_cos_sin(
    grid_hw: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    device: Optional[Union[torch.device, str]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the VIP's 2D RoPE (the Qwen ViT convention).

    Each image's tokens are numbered row-major on its own grid, from (0, 0).
    With D = head_dim, inv_freq = 1 / theta^(arange(0, D/2, 2) / (D/2)) (D/4
    values); angles = [row * inv_freq, col * inv_freq] (D/2 values); the tables
    are cos/sin of [angles, angles] (D values), to be used with ``apply_rope``.

    Args:
        grid_hw: int [n_images, 2], (rows, cols) per image.
        head_dim: D, must be divisible by 4.
        theta: RoPE base.
        device: where to build the tables (default: grid_hw's device).
        dtype: float32 matches the public implementation bit for bit (it
            builds the frequencies in float32 whatever the model dtype);
            float64 is for references.
    Returns:
        (cos, sin), each [N, head_dim] in ``dtype``, N = sum(rows * cols).
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_cos_sin: head_dim must be divisible by 4, got {head_dim}")
    if device is None:
        device = grid_hw.device if isinstance(grid_hw, torch.Tensor) else "cpu"
    return _rope_2d_tables(positions_from_grid(grid_hw, device=device), head_dim, theta, device, dtype)


def positions_from_grid(
    grid_hw: Union[torch.Tensor, Sequence[Sequence[int]]],
    device: Optional[Union[torch.device, str]] = None,
) -> torch.Tensor:
    """Per-token (row, col) of images laid out as full row-major grids.

    Args:
        grid_hw: int [n_images, 2], (rows, cols) per image.
        device: where to build the result (default: grid_hw's device, else CPU).
    Returns:
        int64 [N, 2], N = sum(rows * cols): each image's tokens row-major,
        numbered from (0, 0) on its own grid, images one after another.
    """
    if device is None:
        device = grid_hw.device if isinstance(grid_hw, torch.Tensor) else "cpu"
    rows, cols = [], []
    for h, w in _grid_list(grid_hw):
        rows.append(torch.arange(h, device=device).repeat_interleave(w))
        cols.append(torch.arange(w, device=device).repeat(h))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.long, device=device)
    return torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1)


def rope_2d_cos_sin_from_positions(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    device: Optional[Union[torch.device, str]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of the VIP's 2D RoPE for explicit per-token positions.

    Same tables as :func:`rope_2d_cos_sin`, but each token's (row, col) is
    given instead of derived from a full grid, for images whose tokens are
    not one row-major grid (LLaVA-NeXT: a base grid, then an unpadded
    high-res grid with a newline token after each row).

    Args:
        positions: int [N, 2], (row, col) of each token, >= 0.
        head_dim, theta, device, dtype: as in :func:`rope_2d_cos_sin`
            (device defaults to positions' device).
    Returns:
        (cos, sin), each [N, head_dim] in ``dtype``.
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_cos_sin_from_positions: head_dim must be divisible by 4, got {head_dim}")
    _check_positions(positions)
    if device is None:
        device = positions.device
    return _rope_2d_tables(positions.to(device), head_dim, theta, device, dtype)


def _check_positions(positions: torch.Tensor) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != 2:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be a tensor of shape [N, 2] (row, col), got {shape}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.numel() and bool((positions < 0).any()):
        raise ValueError("positions must be non-negative")


def _rope_2d_tables(positions: torch.Tensor, head_dim: int, theta: float, device,
                    dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=dtype, device=device) / half))
    row = positions[:, 0].to(dtype)
    col = positions[:, 1].to(dtype)
    angles = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], dim=-1)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [N, heads, D] by tables [N, D]: x*cos + rotate_half(x)*sin.

    Computed in the tables' dtype (float32 at least, like the public code,
    so bf16 models do not rotate in bf16) and cast back to x's dtype.
    """
    ct = torch.promote_types(cos.dtype, torch.float32)
    xf = x.to(ct)
    c, s = cos.to(ct)[:, None, :], sin.to(ct)[:, None, :]
    return (xf * c + _rotate_half(xf) * s).to(x.dtype)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a weight only, normalising in float32 like HF's
    Qwen2/Llama RMSNorm (float64 inputs stay float64) and casting back to the
    input dtype before the weight multiply, so bf16 outputs match HF's."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]."""
        in_dtype = x.dtype
        xf = x.to(torch.promote_types(in_dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _MLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner, bias=True)
        self.up_proj = nn.Linear(dim, inner, bias=True)
        self.down_proj = nn.Linear(inner, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _CondAttention(nn.Module):
    """Bidirectional per-image attention whose q/k also see the condition."""

    def __init__(self, hidden: int, cond: int, num_heads: int) -> None:
        super().__init__()
        qk = hidden + cond
        self.num_heads = num_heads
        self.q_proj = nn.Linear(qk, qk, bias=False)
        self.k_proj = nn.Linear(qk, qk, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cos: Optional[torch.Tensor],
                sin: Optional[torch.Tensor], lengths: List[int], fused=None) -> torch.Tensor:
        n = x.shape[0]
        qk_in = torch.cat([x, cond], dim=-1)
        if fused is not None:
            # The fused kernel rotates q/k itself (2D RoPE from int positions).
            out = fused(self.q_proj(qk_in).view(n, self.num_heads, -1),
                        self.k_proj(qk_in).view(n, self.num_heads, -1),
                        self.v_proj(x).view(n, self.num_heads, -1))
            return self.o_proj(out.reshape(n, -1))
        q = apply_rope(self.q_proj(qk_in).view(n, self.num_heads, -1), cos, sin)
        k = apply_rope(self.k_proj(qk_in).view(n, self.num_heads, -1), cos, sin)
        v = self.v_proj(x).view(n, self.num_heads, -1)
        # SDPA's default scale is 1/sqrt(q head dim), which is what the VIP
        # uses; its math path accepts v's head dim differing from q/k's.
        if len(set(lengths)) == 1:
            # Equal-sized images (video frames, uniform batches): one batched
            # call instead of a Python loop.
            b, m = len(lengths), lengths[0]
            out = F.scaled_dot_product_attention(
                q.view(b, m, self.num_heads, -1).transpose(1, 2),
                k.view(b, m, self.num_heads, -1).transpose(1, 2),
                v.view(b, m, self.num_heads, -1).transpose(1, 2))
            out = out.transpose(1, 2).reshape(n, -1)
        else:
            # Per-image calls cost sum(n_i^2) instead of the N^2 of a
            # block-diagonal mask over all images.
            outs = []
            start = 0
            for m in lengths:
                sl = slice(start, start + m)
                o = F.scaled_dot_product_attention(
                    q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1))
                outs.append(o.transpose(0, 1).reshape(m, -1))
                start += m
            out = torch.cat(outs, dim=0)
        return self.o_proj(out)


class _VIPBlock(nn.Module):
    def __init__(self, cfg: GlimpseConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = _CondAttention(cfg.hidden_size, cfg.cond_size, cfg.num_heads)
        self.mlp = _MLP(cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size)

    def forward(self, x, cond, cos, sin, lengths, fused=None):
        x = x + self.attn(self.norm1(x), cond, cos, sin, lengths, fused)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------
# VIP
# --------------------------------------------------------------------------


class VIP(nn.Module):
    """Visual token importance predictor.

    ``attn_in_proj`` lifts each token's glimpse-attention row to
    ``hidden_size``; block m mixes in ``cond_in_projs[m](V_m)`` through
    conditional attention (q/k from [x, cond], v from x, 2D RoPE, per image)
    and a SwiGLU MLP; ``attn_out_projs[-1]`` gives one logit per token.
    """

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_conditions
        self.attn_in_proj = nn.Linear(config.llm_num_heads, config.hidden_size, bias=True)
        self.cond_in_projs = nn.ModuleList(
            nn.Linear(config.vision_width, config.cond_size, bias=True) for _ in range(n))
        self.layers = nn.ModuleList(_VIPBlock(config) for _ in range(n))
        # Identities keep the output head at index n-1, where the public
        # checkpoint stores it (its training code had one head slot per block).
        self.attn_out_projs = nn.ModuleList(
            [nn.Identity() for _ in range(n - 1)] + [nn.Linear(config.hidden_size, 1, bias=True)])

    @property
    def dtype(self) -> torch.dtype:
        return self.attn_in_proj.weight.dtype

    def forward(self, attn_map: torch.Tensor, conditions: Sequence[torch.Tensor],
                grid_hw: Optional[torch.Tensor] = None, *,
                positions: Optional[torch.Tensor] = None,
                lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Keep logits for every visual token.

        Token layout: either ``grid_hw`` (each image one full row-major grid)
        or ``positions`` + ``lengths`` (explicit per-token 2D positions, for
        images whose tokens are not one grid, e.g. LLaVA-NeXT's base grid +
        unpadded high-res grid + newline tokens). Both give the same logits
        when the positions are those of the grids.

        Args:
            attn_map: [N, llm_num_heads], glimpse attention map of all images
                concatenated in order (row-major tokens within an image).
            conditions: ``num_conditions`` tensors [N, vision_width], deep to
                shallow; the m-th feeds block m.
            grid_hw: int [n_images, 2], (rows, cols) of each image's token
                grid; sum(rows * cols) must equal N.
            positions: int [N, 2], (row, col) of each token (RoPE input);
                keyword only, with ``lengths`` and without ``grid_hw``.
            lengths: tokens of each image (each >= 1, summing to N); each
                image is one bidirectional attention segment.
        Returns:
            [N] logits, float32 (float64 if the module is float64). Inputs are
            cast to the parameters' dtype; RoPE and norms run in float32.
        """
        cfg = self.config
        if positions is None:
            if lengths is not None:
                raise ValueError("VIP: lengths is only used together with positions")
            if grid_hw is None:
                raise ValueError("VIP: pass grid_hw, or positions and lengths")
            grid = _grid_list(grid_hw)
            lengths = [h * w for h, w in grid]
            layout = f"grid_hw {grid}"
        else:
            if grid_hw is not None:
                raise ValueError("VIP: pass either grid_hw or positions + lengths, not both")
            if lengths is None:
                raise ValueError("VIP: positions needs lengths (tokens per image)")
            _check_positions(positions)
            lengths = [int(m) for m in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
            if any(m < 1 for m in lengths):
                raise ValueError(f"VIP: lengths must be >= 1, got {lengths}")
            if sum(lengths) != positions.shape[0]:
                raise ValueError(
                    f"VIP: lengths {lengths} sum to {sum(lengths)} but positions has "
                    f"{positions.shape[0]} rows")
            layout = f"lengths {lengths}"
        n = sum(lengths)
        if attn_map.dim() != 2 or attn_map.shape[1] != cfg.llm_num_heads:
            raise ValueError(
                f"VIP: attn_map must be [N, llm_num_heads={cfg.llm_num_heads}], "
                f"got {tuple(attn_map.shape)}")
        if attn_map.shape[0] != n:
            raise ValueError(
                f"VIP: attn_map has {attn_map.shape[0]} rows but {layout} "
                f"gives {n} tokens")
        if len(conditions) != cfg.num_conditions:
            raise ValueError(
                f"VIP: expected {cfg.num_conditions} conditions (vision_layers="
                f"{cfg.vision_layers}), got {len(conditions)}")
        for m, c in enumerate(conditions):
            if c.dim() != 2 or tuple(c.shape) != (n, cfg.vision_width):
                raise ValueError(
                    f"VIP: conditions[{m}] must be [N={n}, vision_width="
                    f"{cfg.vision_width}], got {tuple(c.shape)}")

        dtype, device = self.dtype, self.attn_in_proj.weight.device
        out_dtype = torch.promote_types(dtype, torch.float32)
        if n == 0:
            return torch.zeros(0, dtype=out_dtype, device=device)
        fused = _fused_attention(self, device, dtype, positions, grid if positions is None else None, lengths,
                                 (attn_map, *conditions))
        if fused is not None:
            cos = sin = None  # the kernel builds the rotary angles itself
        elif positions is None:
            cos, sin = rope_2d_cos_sin(grid, cfg.qk_head_dim, cfg.rope_theta,
                                       device=device, dtype=out_dtype)
        else:
            # (positions were validated above)
            cos, sin = _rope_2d_tables(positions.to(device), cfg.qk_head_dim, cfg.rope_theta,
                                       device, out_dtype)
        x = self.attn_in_proj(attn_map.to(device=device, dtype=dtype))
        for block, proj, v_m in zip(self.layers, self.cond_in_projs, conditions):
            cond = proj(v_m.to(device=device, dtype=dtype))
            x = block(x, cond, cos, sin, lengths, fused)
        return self.attn_out_projs[-1](x).squeeze(-1).to(out_dtype)


def _fused_attention(vip: "VIP", device: torch.device, dtype: torch.dtype,
                     positions: Optional[torch.Tensor], grid: Optional[List[Tuple[int, int]]],
                     lengths: List[int], inputs: Sequence[torch.Tensor]):
    """The fused CUDA attention (``token_prune._ops.vip_attention``) bound to this call's
    layout, when it applies: CUDA tensors in bfloat16/float16 with the compiled kernels
    loaded and enabled (CPU tensors only inside ``_ops.use_kernels(on_cpu=True)``, which
    tests use), and no gradient wanted (the kernel has no backward). Imported lazily so
    this module still works on its own."""
    try:
        from . import _ops
    except ImportError:  # used outside the package
        return None
    if not _ops.kernels_active(device, *inputs, *vip.parameters()):
        return None
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        return None
    cfg = vip.config
    pos = positions_from_grid(grid, device=device) if positions is None else positions.to(device)
    pos = pos.to(torch.int32)
    cu = _ops.cu_seqlens_from_sizes(lengths, device)
    longest = max(lengths)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _ops.vip_attention(q, k, v, pos, cu, longest, theta=cfg.rope_theta)

    return attend


# --------------------------------------------------------------------------
# Glimpse embeddings
# --------------------------------------------------------------------------


class GlimpseEmbedding(nn.Module):
    """The learned glimpse token: one vector per decoder layer, each passed
    through ``proj`` (Linear H->H) and ``norm`` (RMSNorm) before use."""

    def __init__(self, llm_hidden_size: int, llm_num_layers: int,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.empty(llm_num_layers, 1, llm_hidden_size))
        nn.init.normal_(self.embeddings, mean=0.0, std=0.02)
        self.proj = nn.Linear(llm_hidden_size, llm_hidden_size, bias=True)
        self.norm = RMSNorm(llm_hidden_size, eps=eps)

    @property
    def num_layers(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, layer: int) -> torch.Tensor:
        """Glimpse vector for decoder layer ``layer``: [H]."""
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise ValueError(f"GlimpseEmbedding: layer must be in [0, {self.num_layers}), got {layer!r}")
        return self.norm(self.proj(self.embeddings[layer, 0]))

    def all_layers(self, upto: int) -> torch.Tensor:
        """Glimpse vectors of layers 0..upto in one batched call: [upto+1, H]."""
        if not _is_int(upto) or not 0 <= upto < self.num_layers:
            raise ValueError(f"GlimpseEmbedding: upto must be in [0, {self.num_layers}), got {upto!r}")
        return self.norm(self.proj(self.embeddings[: upto + 1, 0]))


# --------------------------------------------------------------------------
# Container, serialisation, public checkpoint import
# --------------------------------------------------------------------------


def _check_state_dict(expected: Mapping[str, torch.Tensor],
                      got: Mapping[str, torch.Tensor],
                      source: str,
                      display: Optional[Mapping[str, str]] = None) -> None:
    """Raise ValueError listing missing/unexpected keys and shape mismatches.

    ``display`` maps our key names to the names the user's file uses, so the
    error points at what they can look up in their checkpoint.
    """
    show = (lambda k: display.get(k, k)) if display else (lambda k: k)
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(show(k) for k in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(show(k) for k in unexpected))
    for k in sorted(set(expected) & set(got)):
        if not isinstance(got[k], torch.Tensor):
            problems.append(f"{show(k)} is a {type(got[k]).__name__}, not a tensor")
        elif tuple(got[k].shape) != tuple(expected[k].shape):
            problems.append(
                f"shape mismatch for {show(k)}: checkpoint has {tuple(got[k].shape)}, "
                f"model expects {tuple(expected[k].shape)}")
        elif not got[k].is_floating_point():
            problems.append(f"{show(k)} has non-float dtype {got[k].dtype}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _common_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    # Mixed dtypes cannot be kept as they are; fall back to float32 rather
    # than silently dropping precision.
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


class GlimpseModules(nn.Module):
    """Everything GlimpsePrune adds to an LVLM: ``glimpse`` + ``vip``."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.glimpse = GlimpseEmbedding(config.llm_hidden_size, config.llm_num_layers,
                                        eps=config.llm_rms_norm_eps)
        self.vip = VIP(config)

    # -- construction -----------------------------------------------------

    @classmethod
    def random(cls, config: GlimpseConfig, seed: Optional[int] = None) -> "GlimpseModules":
        """Randomly initialised modules (Linear default init, norms at 1,
        embeddings N(0, 0.02)). With ``seed`` the result is deterministic and
        the global RNG state is left untouched."""
        if seed is None:
            return cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def check_compatible(self, llm_hidden_size: int, llm_num_layers: int,
                         llm_num_heads: int, vision_width: int,
                         num_vision_blocks: int) -> None:
        """Raise ValueError if these modules do not fit a model of these sizes.

        Args:
            llm_hidden_size, llm_num_layers, llm_num_heads: the LLM's.
            vision_width: width of the ViT blocks' outputs.
            num_vision_blocks: number of ViT blocks (vision_layers must index them).
        """
        cfg = self.config
        problems = []
        for name, want in (("llm_hidden_size", llm_hidden_size),
                           ("llm_num_layers", llm_num_layers),
                           ("llm_num_heads", llm_num_heads),
                           ("vision_width", vision_width)):
            have = getattr(cfg, name)
            if have != want:
                problems.append(f"{name}: glimpse modules have {have}, model has {want}")
        bad = [v for v in cfg.vision_layers if v >= num_vision_blocks]
        if bad:
            problems.append(
                f"vision_layers {bad} out of range for a vision tower with "
                f"{num_vision_blocks} blocks")
        if problems:
            raise ValueError("Glimpse modules do not fit this model: " + "; ".join(problems))

    # -- our format -----------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path/glimpse_config.json`` and ``path/model.safetensors``
        (keys ``glimpse.*``, ``vip.*``); creates the directory."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "config": self.config.to_dict()}
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE),
                  metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             map_location: Union[str, torch.device] = "cpu") -> "GlimpseModules":
        """Read a directory written by ``save``. The modules take the dtype
        of the stored tensors."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"GlimpseModules.load: no such directory: {path}")
        cfg_path = os.path.join(path, CONFIG_FILE)
        w_path = os.path.join(path, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GlimpseModules.load: missing file {p}")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"GlimpseModules.load: {cfg_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or "config" not in meta:
            raise ValueError(
                f"GlimpseModules.load: {cfg_path} is not a {FORMAT_NAME} config "
                "(expected keys 'format', 'format_version', 'config')")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"GlimpseModules.load: {cfg_path} has format_version {version!r}; "
                f"this version reads {FORMAT_VERSION}")
        config = GlimpseConfig.from_dict(meta["config"])
        try:
            state = load_file(w_path, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"GlimpseModules.load: cannot read {w_path}: {e}") from e
        return cls._from_state(config, state, source=w_path)

    @classmethod
    def _from_state(cls, config: GlimpseConfig, state: Mapping[str, torch.Tensor],
                    source: str, display: Optional[Mapping[str, str]] = None) -> "GlimpseModules":
        # Build on the meta device: the weights are about to be replaced, so
        # running the random init (N(0, .02) over [L, 1, H] etc.) is waste.
        with torch.device("meta"):
            mods = cls(config)
        _check_state_dict(mods.state_dict(), state, source, display)
        device = next(iter(state.values())).device
        mods = mods.to_empty(device=device).to(_common_float_dtype(state))
        mods.load_state_dict(state, strict=True)
        return mods

    # -- public GlimpsePrune format ------------------------------------------

    @classmethod
    def from_public_checkpoint(cls, path: Union[str, os.PathLike],
                               config_overrides: Optional[Mapping[str, Any]] = None
                               ) -> "GlimpseModules":
        """Import the public GlimpsePrune layout.

        ``path`` holds ``config.json`` (the wrapped LVLM's HF config plus
        GlimpsePrune fields) and ``new_modules_gp.pt`` (entries ``attn_fuser``,
        ``learnable_embeddings`` [L, 1, H], ``le_proj``, ``le_norm``).
        ``config_overrides`` replaces GlimpseConfig fields after parsing (e.g.
        ``vision_width`` when the config does not state it). Only checkpoints
        with a glimpse vector for every layer 0..L-1 are supported. Auxiliary
        deep-supervision heads ``attn_out_projs.{0..n-2}`` are ignored (only
        the last head is used at inference). Modules take the checkpoint's dtype.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_public_checkpoint: no such directory: {path}")
        cfg_path = os.path.join(path, PUBLIC_CONFIG_FILE)
        w_path = os.path.join(path, PUBLIC_WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"from_public_checkpoint: missing file {p}")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"from_public_checkpoint: {cfg_path} is not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ValueError(f"from_public_checkpoint: {cfg_path} must hold a JSON object")

        try:
            ckpt = torch.load(w_path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise ValueError(f"from_public_checkpoint: cannot read {w_path}: {e}") from e
        if not isinstance(ckpt, dict):
            raise ValueError(f"from_public_checkpoint: {w_path} must hold a dict, got {type(ckpt).__name__}")
        entries = ("attn_fuser", "learnable_embeddings", "le_proj", "le_norm")
        missing = [e for e in entries if e not in ckpt]
        unexpected = sorted(str(k) for k in ckpt if k not in entries)
        if missing or unexpected:
            raise ValueError(
                f"from_public_checkpoint: {w_path}: missing entries {missing}, "
                f"unexpected entries {unexpected} (expected exactly {list(entries)})")
        for e in ("attn_fuser", "le_proj", "le_norm"):
            if not isinstance(ckpt[e], Mapping):
                raise ValueError(f"from_public_checkpoint: {w_path}: '{e}' must be a state dict")
        if not isinstance(ckpt["learnable_embeddings"], torch.Tensor):
            raise ValueError(f"from_public_checkpoint: {w_path}: 'learnable_embeddings' must be a tensor")

        fields_ = _public_config_fields(hf, cfg_path, ckpt)
        if config_overrides:
            names = {f.name for f in fields(GlimpseConfig)}
            unknown = sorted(set(config_overrides) - names)
            if unknown:
                raise ValueError(f"from_public_checkpoint: unknown config_overrides {unknown}")
            fields_.update(config_overrides)
        if fields_.get("vision_width") is None:
            raise ValueError(
                f"from_public_checkpoint: {cfg_path} gives no vision width "
                "(vision_config.hidden_size or mm_hidden_size); pass "
                "config_overrides={'vision_width': ...}")
        config = GlimpseConfig.from_dict(fields_)

        n = config.num_conditions
        state: Dict[str, torch.Tensor] = {}
        display: Dict[str, str] = {}
        aux_heads = tuple(f"attn_out_projs.{i}." for i in range(n - 1))
        for k, v in ckpt["attn_fuser"].items():
            if k.startswith(aux_heads):
                continue
            state["vip." + k] = v
            display["vip." + k] = "attn_fuser." + k
        state["glimpse.embeddings"] = ckpt["learnable_embeddings"]
        display["glimpse.embeddings"] = "learnable_embeddings"
        for src, dst in (("le_proj", "glimpse.proj"), ("le_norm", "glimpse.norm")):
            for k, v in ckpt[src].items():
                state[f"{dst}.{k}"] = v
                display[f"{dst}.{k}"] = f"{src}.{k}"
        # Name keys the checkpoint lacks by their public names too.
        for k in cls._expected_keys(config):
            if k not in display:
                display[k] = _public_name(k)
        return cls._from_state(config, state, source=w_path, display=display)

    @classmethod
    def _expected_keys(cls, config: GlimpseConfig) -> List[str]:
        with torch.device("meta"):
            return list(cls(config).state_dict().keys())


def _public_name(key: str) -> str:
    if key.startswith("vip."):
        return "attn_fuser." + key[4:]
    return {"glimpse.embeddings": "learnable_embeddings"}.get(
        key, key.replace("glimpse.proj.", "le_proj.").replace("glimpse.norm.", "le_norm."))


def _public_config_fields(hf: Mapping[str, Any], cfg_path: str,
                          ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """GlimpseConfig fields from a public GlimpsePrune config.json."""
    text = hf.get("text_config") if isinstance(hf.get("text_config"), Mapping) else {}
    vision = hf.get("vision_config") if isinstance(hf.get("vision_config"), Mapping) else {}

    def llm(key: str, default: Any = MISSING) -> Any:
        # Composite configs (LLaVA-HF, newer Qwen2.5-VL) keep the LLM's sizes
        # in text_config; older ones have them at the top level.
        if key in text:
            return text[key]
        if key in hf:
            return hf[key]
        if default is not MISSING:
            return default
        raise ValueError(f"from_public_checkpoint: {cfg_path} has no '{key}' "
                         "(looked at the top level and in text_config)")

    def gp(key: str, default: Any = MISSING) -> Any:
        if key in hf:
            return hf[key]
        if default is not MISSING:
            return default
        raise ValueError(f"from_public_checkpoint: {cfg_path} has no GlimpsePrune field '{key}'")

    num_layers = llm("num_hidden_layers")
    selected = list(gp("selected_layers"))
    if len(selected) != 1:
        raise ValueError(
            f"from_public_checkpoint: selected_layers={selected}; only checkpoints "
            "reading a single decoder layer are supported")
    le_layers = list(gp("le_layers"))
    if not _is_int(num_layers) or le_layers != list(range(num_layers)):
        raise ValueError(
            f"from_public_checkpoint: le_layers={le_layers} must be every layer "
            f"0..{num_layers - 1 if _is_int(num_layers) else '?'} in order; only "
            "checkpoints with a glimpse vector per decoder layer are supported")
    for key, want in (("attn_fuse_type", "AttnFuserV1"), ("attn_fuse_hidden_act", "silu"),
                      ("le_length", 1), ("le_norm_type", "rmsnorm")):
        if key in hf and hf[key] != want:
            raise ValueError(
                f"from_public_checkpoint: {key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("attn_fuse_global") is False:
        warnings.warn(
            f"{cfg_path}: attn_fuse_global is false (the public Qwen code then "
            "attends within ViT windows); this VIP always attends over whole "
            "images, so its outputs may differ from the original's", stacklevel=3)

    vision_width = vision.get("hidden_size", hf.get("mm_hidden_size"))
    if vision_width is None:
        # LLaVA-1.5 configs name the vision tower but not its width; the
        # condition projections' input width states it unambiguously.
        w = ckpt["attn_fuser"].get("cond_in_projs.0.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            vision_width = int(w.shape[1])

    return {
        "llm_hidden_size": llm("hidden_size"),
        "llm_num_layers": num_layers,
        "llm_num_heads": llm("num_attention_heads"),
        "llm_rms_norm_eps": float(llm("rms_norm_eps", 1e-6)),
        "vision_width": vision_width,
        "vision_layers": list(gp("selected_visual_layers")),
        "layer": selected[0],
        "glimpse_score": "logits" if gp("use_attention_logits", False) else "log_softmax",
        "hidden_size": gp("attn_fuse_size"),
        "cond_size": gp("visual_cond_size"),
        "num_heads": gp("attn_fuse_num_heads"),
        "model_type": str(hf.get("model_type", "")),
    }
