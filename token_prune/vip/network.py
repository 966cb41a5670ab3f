"""The VIP network (conditional attention blocks with 2D RoPE) and the glimpse embeddings."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from .config import GlimpseConfig, _is_int
from .rope import _check_positions, _grid_list, _rope_2d_tables, apply_rope, positions_from_grid, rope_2d_cos_sin


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
        from .. import _ops
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
