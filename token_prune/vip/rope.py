"""2D rotary positions of visual tokens on their image's token grid (also the reference of the
fused VIP attention kernel)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from .config import _is_int


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
