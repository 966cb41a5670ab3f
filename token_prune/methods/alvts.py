"""ALVTS: adaptive layer-wise visual token selection (training-free skip-and-merge).

Before every decoder layer from ``start_layer`` on, a low-rank copy of the layer's own query/key
projections scores all visual tokens; the top ``ceil(keep_ratio * N)`` of each image go through
the layer with all text tokens, the others skip it (attention and MLP), their hidden state
passing through unchanged, and both streams are merged back in the original order. All tokens
stay in the residual stream, so a token skipped at one layer can be selected at the next.

Score of visual token i (per sample, real tokens only, causal like the layer itself):
``S(i) = mean_j∈visual A[j, i] * mean_j∈text A[j, i]`` with ``A = softmax(q~ k~^T / sqrt(d))``
averaged over heads, ``q~ = norm(x) A_Q^T B_Q^T + b_Q`` (rotary applied), likewise for k.

What a skipped token contributes at a layer it skips is left open by the paper; the ``skipped``
option picks one of two readings:

* ``"context"`` (default): the skipped token is not updated by the layer (no query, output
  projection or MLP for it), but its unchanged hidden state still provides a key and a value,
  so the text and the selected tokens attend to every visual token at every layer. Skipped rows
  cost only their K/V projections (about 1.6% of a token-layer for Qwen2.5-VL-7B with GQA), and
  every layer's KV cache holds the whole prompt, so decoding is as fast as unpatched.
* ``"drop"``: the skipped token is invisible at that layer, so that layer's KV cache holds only
  the tokens it processed; decoding keeps exactly that (at layer l a new token attends to the
  text tokens and the visual tokens layer l selected), with one mask per layer (see
  ``handle.stats[i]["kv_len"]``). Smaller caches and faster decoding, but every layer only sees
  ``keep_ratio`` of the image.

On the package's accuracy benchmark (``bench/results/accuracy_*.md``) the two differ sharply at
``keep_ratio=0.111``: see the ALVTS rows there.
"""

from __future__ import annotations

import json
import math
import os
import weakref

import torch

from .. import _ops, hf, nvtx
from ..models.base import head_norm
from ..runtime import PrefillResult, causal_mask, compact_batch, keep_mask_from_scores, sample_stats
from .base import PruningMethod, check_fraction, check_int, check_layer, image_sizes

FORMAT = "token_prune.alvts_selector"
#: ``impl`` of :func:`selection_scores` during a prefill ("auto": fused SDPA on a GPU)
PREFILL_SCORES = "auto"
SKIPPED_MODES = ("context", "drop")
_SVD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors of a Linear weight.

    Args:
        weight: [out, in] (``y = x @ weight.T``).
        rank: R.

    Returns:
        (a [R, in], b [out, R]) with ``weight ≈ b @ a``: ``b = U_R S_R^1/2``, ``a = S_R^1/2 V_R^T``.
    """
    w = weight.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).to(weight.dtype), (u[:, :r] * root[None]).to(weight.dtype)


class LowRankSelector(torch.nn.Module):
    """Per-layer low-rank query/key factors.

    ``factors[l]`` holds ``q_a`` [R, H], ``q_b`` [heads*d, R], ``k_a`` [R, H], ``k_b`` [kv_heads*d, R].
    """

    def __init__(self, factors: dict[int, dict[str, torch.Tensor]], rank: int):
        super().__init__()
        self.rank = rank
        self.layers = torch.nn.ModuleDict()
        for layer, f in factors.items():
            m = torch.nn.Module()
            for name, t in f.items():
                m.register_parameter(name, torch.nn.Parameter(t.detach().clone(), requires_grad=False))
            self.layers[str(layer)] = m

    @classmethod
    def from_svd(cls, adapter, rank: int, layers: list[int]) -> "LowRankSelector":
        """SVD factors of each layer's own q/k projections (cached per projection module)."""
        factors = {}
        for li in layers:
            attn = adapter.lm.layers[li].self_attn
            f = {}
            for name, proj in (("q", attn.q_proj), ("k", attn.k_proj)):
                key = (rank, proj.weight._version, proj.weight.data_ptr())
                hit = _SVD_CACHE.get(proj)
                if hit is None or hit[0] != key:
                    hit = (key, svd_factors(proj.weight, rank))
                    _SVD_CACHE[proj] = hit
                f[f"{name}_a"], f[f"{name}_b"] = hit[1]
            factors[li] = f
        return cls(factors, rank)

    def has(self, layer: int) -> bool:
        return str(layer) in self.layers

    def qk(self, adapter, layer: int, hidden: torch.Tensor, cos, sin):
        """Low-rank q~ [B, heads, S, d] and k~ [B, kv_heads, S, d] (rotary applied) of ``hidden`` [B, S, H]."""
        f = self.layers[str(layer)]
        mod = adapter.lm.layers[layer]
        attn = mod.self_attn
        h = mod.input_layernorm(hidden)
        B, S, _ = h.shape
        d = adapter.head_dim
        q = (h @ f.q_a.T.to(h.dtype)) @ f.q_b.T.to(h.dtype)
        k = (h @ f.k_a.T.to(h.dtype)) @ f.k_b.T.to(h.dtype)
        if attn.q_proj.bias is not None:
            q = q + attn.q_proj.bias
        if attn.k_proj.bias is not None:
            k = k + attn.k_proj.bias
        q = head_norm(attn, "q", q.view(B, S, -1, d)).transpose(1, 2)
        k = head_norm(attn, "k", k.view(B, S, -1, d)).transpose(1, 2)
        return hf.apply_rotary(q, cos, sin), hf.apply_rotary(k, cos, sin)

    def save(self, path, meta: dict | None = None) -> None:
        """Write ``selector.safetensors`` + ``selector.json`` into directory ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {f"layers.{l}.{n}": p.detach().contiguous().cpu() for l, m in self.layers.items()
                   for n, p in m.named_parameters()}
        save_file(tensors, os.path.join(path, "selector.safetensors"))
        info = {"format": FORMAT, "version": 1, "rank": self.rank, "layers": sorted(int(k) for k in self.layers)}
        info.update(meta or {})
        with open(os.path.join(path, "selector.json"), "w") as f:
            json.dump(info, f, indent=2)

    @classmethod
    def load(cls, path) -> tuple["LowRankSelector", dict]:
        from safetensors.torch import load_file

        path = os.fspath(path)
        cfg_path = os.path.join(path, "selector.json")
        w_path = os.path.join(path, "selector.safetensors")
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ALVTS selector: {p} not found (expected a directory written by "
                                        "calibrate_alvts / LowRankSelector.save)")
        with open(cfg_path) as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError(f"ALVTS selector: {cfg_path} is not a {FORMAT} file")
        tensors = load_file(w_path)
        factors: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            _, layer, name = key.split(".")
            factors.setdefault(int(layer), {})[name] = t
        return cls(factors, info["rank"]), info

    def check_compatible(self, adapter) -> None:
        H, d = adapter.hidden_size, adapter.head_dim
        shapes = {"q_a": (self.rank, H), "k_a": (self.rank, H), "q_b": (adapter.num_heads * d, self.rank),
                  "k_b": (adapter.num_kv_heads * d, self.rank)}
        for layer, m in self.layers.items():
            if int(layer) >= adapter.num_layers:
                raise ValueError(f"ALVTS selector has layer {layer} but the model has {adapter.num_layers} layers")
            for name, shape in shapes.items():
                got = tuple(getattr(m, name).shape)
                if got != shape:
                    raise ValueError(f"ALVTS selector layers.{layer}.{name} has shape {got}, the model needs {shape}")


def selection_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor,
                     chunk: int = 1024, impl: str = "auto") -> torch.Tensor:
    """ALVTS importance of every token: mean attention received from visual queries times mean
    attention received from text queries (causal, real tokens only, head-averaged).

    Two implementations of the same number:

    * ``"chunked"``: explicit softmax over query blocks of ``chunk`` rows in float32 (float64 for
      float64 inputs), so no [S, S] matrix per head is held at once. Differentiable in q and k
      (calibration uses it); the reference for the other.
    * ``"sdpa"``: the value-gradient of one ``scaled_dot_product_attention`` call. For
      ``out = softmax(q k^T / sqrt(d)) v``, ``d<out, g>/dv = P^T g``: with ``g`` holding the
      per-query weights (1 for visual queries in one channel, 1 for text queries in another),
      ``dv`` is the attention each key receives from each group, and the fused (flash /
      memory-efficient) attention kernels compute it without any [S, S] matrix in memory, in the
      input dtype with float32 accumulation. Not differentiable.

    ``"auto"`` picks ``"sdpa"`` on a GPU unless q or k needs gradients, else ``"chunked"``.

    Args:
        q: [B, heads, S, d]; k: [B, kv_heads, S, d] (rotary applied).
        valid: [B, S] bool real tokens, or None when there is no padding (lets the fused path
            use the plain causal kernel without looking at the mask on the host).
        visual: [B, S] bool visual tokens.

    Returns:
        [B, S] float scores (meaningful at visual positions).
    """
    if impl == "auto":
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        impl = "sdpa" if q.is_cuda and not needs_grad else "chunked"
    if impl == "sdpa":
        return _selection_scores_sdpa(q, k, valid, visual)
    if impl != "chunked":
        raise ValueError(f"impl must be 'auto', 'chunked' or 'sdpa', got {impl!r}")
    B, h, S, d = q.shape
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(acc), k.to(acc)
    vis_q = (visual & valid).to(acc)
    txt_q = (~visual & valid).to(acc)
    recv_vis = q.new_zeros(B, S)
    recv_txt = q.new_zeros(B, S)
    kpos = torch.arange(S, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for start in range(0, S, chunk):
        stop = min(S, start + chunk)
        logits = (q[:, :, start:stop] @ k.transpose(-1, -2)) * scale  # [B, h, c, S]
        allowed = valid[:, None, None, :] & (kpos[None, None, None, :] <= torch.arange(start, stop, device=q.device)[None, None, :, None])
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(logits.softmax(-1)).mean(1)  # [B, c, S]; padded rows are all -inf
        recv_vis += (probs * vis_q[:, start:stop, None]).sum(1)
        recv_txt += (probs * txt_q[:, start:stop, None]).sum(1)
    n_vis = vis_q.sum(1, keepdim=True).clamp(min=1)
    n_txt = txt_q.sum(1, keepdim=True).clamp(min=1)
    return (recv_vis / n_vis) * (recv_txt / n_txt)


def _selection_scores_sdpa(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """:func:`selection_scores` as the value-gradient of one fused attention call (see there)."""
    import torch.nn.functional as F

    B, h, S, d = q.shape
    mask = None
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=q.device)
    else:
        pos = torch.arange(S, device=q.device)
        mask = valid[:, None, None, :] & (pos[None, :] <= pos[:, None])[None, None]
        # A padding row sees itself only: no all-masked row (NaN), and its weight is zero anyway.
        mask = mask | (~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=q.device)[None, None])
    vis_q = visual & valid
    txt_q = ~visual & valid
    # Under torch.inference_mode the inputs are inference tensors, which autograd may not save.
    with torch.inference_mode(False), torch.enable_grad():
        qq = q.detach().clone()
        kk = k.detach().repeat_interleave(h // k.shape[1], dim=1)
        v = torch.zeros_like(qq, requires_grad=True)
        out = F.scaled_dot_product_attention(qq, kk, v, attn_mask=mask, is_causal=mask is None)
        g = torch.zeros_like(out)
        g[..., 0] = vis_q[:, None, :].to(g.dtype)
        g[..., 1] = txt_q[:, None, :].to(g.dtype)
        (dv,) = torch.autograd.grad(out, v, g)
    acc = torch.promote_types(q.dtype, torch.float32)
    recv = dv[..., :2].to(acc).sum(1)  # [B, S, 2], summed over heads
    n_vis = vis_q.sum(1, keepdim=True).clamp(min=1).to(acc) * h
    n_txt = txt_q.sum(1, keepdim=True).clamp(min=1).to(acc) * h
    return (recv[..., 0] / n_vis) * (recv[..., 1] / n_txt)


def topk_per_image(scores: torch.Tensor, visual: torch.Tensor, sizes: list[int], keep_ratio: float) -> torch.Tensor:
    """[B, S] bool: the top ``ceil(keep_ratio * n)`` visual tokens of each image (ties to the earlier token)."""
    sel = torch.zeros_like(visual)
    sel[visual] = keep_mask_from_scores(scores[visual], sizes, keep_ratio=keep_ratio, scores_are_logits=False)
    return sel


def scatter_rows(full: torch.Tensor, packed: torch.Tensor, index: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Write rows of ``packed`` [B, S', H] into a copy of ``full`` [B, S, H] at ``index`` [B, S']
    (original positions, -1 for padding slots, which are skipped).

    On a GPU this is the ``scatter_rows`` kernel; with ``inplace`` it may write into ``full``
    itself (then only the packed rows move; the caller must own ``full``)."""
    if _ops.kernels_active(full.device, full, packed):
        return _ops.scatter_rows(full, packed, index, inplace=inplace)
    out = full.clone()
    ok = index >= 0
    rows = torch.arange(full.shape[0], device=full.device)[:, None].expand_as(index)
    out[rows[ok], index[ok]] = packed[ok]
    return out


class ALVTS(PruningMethod):
    """Options: ``keep_ratio`` (0.11), ``rank`` (None: per-model default), ``start_layer`` (0),
    ``selector`` (None: SVD factors of each layer's q/k; or a directory from
    :func:`~token_prune.alvts_calibration.calibrate_alvts`), ``skipped`` (``"context"`` or
    ``"drop"``: what a skipped token is at a layer it skips; see the module docstring)."""

    name = "alvts"

    def __init__(self, adapter, *, keep_ratio: float = 0.11, rank: int | None = None, start_layer: int = 0,
                 selector=None, skipped: str = "context"):
        super().__init__(adapter)
        self.keep_ratio = check_fraction("keep_ratio", keep_ratio, allow_none=False)
        if skipped not in SKIPPED_MODES:
            raise ValueError(f"skipped must be one of {SKIPPED_MODES}, got {skipped!r}")
        self.skipped = skipped
        n = adapter.num_layers
        self.start_layer = start_layer = check_layer("start_layer", start_layer, n)
        if rank is not None:
            rank = check_int("rank", rank, 1)
        layers = list(range(start_layer, n))
        if selector is None:
            self.rank = rank or adapter.default_alvts_rank()
            self.selector = LowRankSelector.from_svd(adapter, self.rank, layers)
            self.selector_source = "svd"
        else:
            if isinstance(selector, LowRankSelector):
                sel = selector
            elif isinstance(selector, (str, os.PathLike)):
                sel, _ = LowRankSelector.load(selector)
            else:
                raise TypeError(f"selector must be a path, a LowRankSelector or None, got {type(selector).__name__}")
            sel.check_compatible(adapter)
            if rank is not None and rank != sel.rank:
                raise ValueError(f"rank={rank} but the selector was calibrated at rank {sel.rank}")
            missing = [l for l in layers if not sel.has(l)]
            if missing:
                raise ValueError(f"the ALVTS selector has no factors for layers {missing}")
            self.selector, self.rank = sel, sel.rank
            self.selector_source = os.fspath(selector) if not isinstance(selector, LowRankSelector) else "module"
        param = next(adapter.model.parameters())
        self.selector.to(device=param.device, dtype=param.dtype)
        self.last_processed: list[torch.Tensor] = []

    def options(self) -> dict:
        return dict(keep_ratio=self.keep_ratio, rank=self.rank, start_layer=self.start_layer,
                    selector=self.selector_source, skipped=self.skipped)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult:
        adapter = rt.adapter
        sizes = image_sizes(batch.visual, rt.ctx.image_sizes)
        layers = lm.layers
        full_valid = batch.valid
        hidden = batch.hidden
        cos, sin = adapter.rotary(hidden, batch.pos)
        full_mask = causal_mask(lm.config, hidden, batch.mask2d)
        layer_masks, processed = [], []
        # [layers] of [B, S] bool: the prompt tokens each layer processed (for stats, plots, tests).
        self.last_processed = []
        owned = False  # whether `hidden` is a tensor of this prefill (not the caller's), so it may be updated in place
        context = self.skipped == "context"  # skipped rows stay keys/values; caches hold every token
        for i, layer in enumerate(layers):
            if i < self.start_layer:
                self.last_processed.append(full_valid.clone())
                hidden = hf.call_layer(layer, hidden, mask=full_mask, rope=(cos, sin), text_pos=batch.text_pos,
                                       cache=cache, use_cache=use_cache, **kwargs)
                hidden = batch.add_deepstack(i, hidden)
                owned = True
                layer_masks.append(full_valid.long())
                processed.append(batch.visual.sum(1))
                continue
            with nvtx.range("alvts.select"):
                q, k = self.selector.qk(adapter, i, hidden, cos, sin)
                scores = selection_scores(q, k, None if batch.mask2d is None else full_valid, batch.visual,
                                          impl=PREFILL_SCORES)
                sel = topk_per_image(scores, batch.visual, sizes, self.keep_ratio)
                keep = full_valid & (~batch.visual | sel)
            self.last_processed.append(keep)
            batch.hidden = hidden
            with nvtx.range("alvts.compact"):
                sub, _ = compact_batch(batch, keep, [])
                scos, ssin = adapter.rotary(sub.hidden, sub.pos)
                if not context:
                    mask2d = sub.mask2d if not bool(sub.mask2d.bool().all()) else None
                    mask = causal_mask(lm.config, sub.hidden, mask2d)
            with nvtx.range("alvts.layer"):
                if context:
                    out = adapter.layer_rows_with_context(i, hidden, cos, sin, full_valid, sub.index, sub.hidden,
                                                          scos, ssin, cache=cache)
                else:
                    out = hf.call_layer(layer, sub.hidden, mask=mask, rope=(scos, ssin), text_pos=sub.text_pos,
                                        cache=cache, use_cache=use_cache, **kwargs)
            with nvtx.range("alvts.merge"):
                hidden = scatter_rows(hidden, out, sub.index, inplace=owned)
                owned = True
                # The deepstack row belongs to the token: a token that skipped the layer gets it too.
                hidden = batch.add_deepstack(i, hidden)
            if not context:
                layer_masks.append(sub.valid.long())
            processed.append(sel.sum(1))
        batch.hidden = hidden
        per_layer = torch.stack(processed, 1).tolist()  # [B, layers]
        # Nothing leaves the sequence: every item keeps all its tokens; what varies is per layer.
        every = torch.ones(int(batch.visual.sum()), dtype=torch.bool)
        stats = sample_stats(batch, every, sizes, rt.ctx.item_kinds)
        for b, s in enumerate(stats):
            n = s["visual_tokens"]
            s.update(visual_processed=per_layer[b], processed_ratio=[p / n if n else 1.0 for p in per_layer[b]])
        if context:
            layer_masks = None  # every layer's cache holds the whole prompt: one shared decode mask
        return PrefillResult(hidden, batch, stats, layer_masks)
