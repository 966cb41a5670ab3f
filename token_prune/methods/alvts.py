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
from ..runtime import PrefillResult, causal_mask, compact_batch
from .glimpse import _check_fraction

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
        q = q.view(B, S, -1, d).transpose(1, 2)
        k = k.view(B, S, -1, d).transpose(1, 2)
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
    from ..runtime import keep_mask_from_scores

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


class ALVTS:
    """Options: ``keep_ratio`` (0.11), ``rank`` (None: per-model default), ``start_layer`` (0),
    ``selector`` (None: SVD factors of each layer's q/k; or a directory from
    :func:`calibrate_alvts`), ``skipped`` (``"context"`` or ``"drop"``: what a skipped token
    is at a layer it skips; see the module docstring)."""

    name = "alvts"

    def __init__(self, adapter, *, keep_ratio: float = 0.11, rank: int | None = None, start_layer: int = 0,
                 selector=None, skipped: str = "context"):
        _check_fraction("keep_ratio", keep_ratio)
        if skipped not in SKIPPED_MODES:
            raise ValueError(f"skipped must be one of {SKIPPED_MODES}, got {skipped!r}")
        self.skipped = skipped
        if keep_ratio is None:
            raise ValueError("keep_ratio must be in (0, 1], got None")
        n = adapter.num_layers
        if isinstance(start_layer, bool) or not isinstance(start_layer, int):
            raise TypeError(f"start_layer must be an int, got {type(start_layer).__name__}")
        if not 0 <= start_layer < n:
            raise ValueError(f"start_layer must be in [0, {n - 1}] for this {n}-layer model, got {start_layer}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.adapter = adapter
        self.keep_ratio = float(keep_ratio)
        self.start_layer = start_layer
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

    def vision_layers(self) -> list[int]:
        return []

    def options(self) -> dict:
        return dict(keep_ratio=self.keep_ratio, rank=self.rank, start_layer=self.start_layer,
                    selector=self.selector_source, skipped=self.skipped)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs) -> PrefillResult:
        adapter = rt.adapter
        sizes = rt.ctx.image_sizes
        if sizes is None:
            from .fastv import image_sizes_from_runs
            sizes = image_sizes_from_runs(batch.visual, None)
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
            if not context:
                layer_masks.append(sub.valid.long())
            processed.append(sel.sum(1))
        batch.hidden = hidden
        per_layer = torch.stack(processed, 1).tolist()  # [B, layers]
        stats = []
        for b in range(hidden.shape[0]):
            n = int(batch.visual[b].sum())
            stats.append({"prompt_len": int(full_valid[b].sum()), "visual_tokens": n, "kept_tokens": n,
                          "keep_ratio": 1.0, "visual_processed": per_layer[b],
                          "processed_ratio": [p / n if n else 1.0 for p in per_layer[b]]})
        if context:
            layer_masks = None  # every layer's cache holds the whole prompt: one shared decode mask
        return PrefillResult(hidden, batch, stats, layer_masks)


class _Stop(Exception):
    pass


def _layer_inputs(model, adapter, inputs: dict, layer: int):
    """Input hidden states [B, S, H] and rotary (cos, sin) of decoder layer ``layer`` in the
    unpatched model; the forward is cut short right after that layer's input is seen."""
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["rope"] = tuple(t.detach() for t in kwargs["position_embeddings"])
        raise _Stop

    h = adapter.lm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen["x"], seen["rope"]


def _masks(model, inputs):
    ids = inputs["input_ids"]
    valid = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    visual = ids == model.config.image_token_id
    return valid, visual


def score_error(selector, model, samples, layers=None) -> dict:
    """Relative squared error of the selector's scores against the full-rank oracle and the
    overlap of its per-image top-k with the oracle's top-k (k = 11% of each image), per layer.

    Returns ``{"rel_mse": [per layer], "topk_overlap": [per layer]}`` averaged over ``samples``.
    """
    from ..models import adapter_for

    adapter = adapter_for(model)
    layers = layers if layers is not None else sorted(int(k) for k in selector.layers)
    rel, overlap = [], []
    for li in layers:
        r_sum = o_sum = 0.0
        for inputs in samples:
            x, (cos, sin) = _layer_inputs(model, adapter, inputs, li)
            valid, visual = _masks(model, inputs)
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = selection_scores(q, k, valid, visual)
                q, k = selector.qk(adapter, li, x, cos, sin)
                got = selection_scores(q, k, valid, visual)
            r_sum += float(_rel_mse(got, oracle, visual))
            sizes = _runs(visual)
            a = topk_per_image(oracle, visual, sizes, 0.11)
            b = topk_per_image(got, visual, sizes, 0.11)
            o_sum += float((a & b).sum()) / max(1, int(a.sum()))
        rel.append(r_sum / len(samples))
        overlap.append(o_sum / len(samples))
    return {"layers": layers, "rel_mse": rel, "topk_overlap": overlap}


def _rel_mse(got, oracle, visual):
    # Scores are products of mean attentions (~1/N^2): compare relative to the oracle's scale.
    g, o = got[visual].float(), oracle[visual].float()
    return ((g - o) ** 2).mean() / (o ** 2).mean().clamp(min=1e-30)


def _runs(visual):
    from .fastv import image_sizes_from_runs

    return image_sizes_from_runs(visual, None)


def calibrate_alvts(model, samples, rank: int | None = None, steps: int = 200, lr: float = 1e-3,
                    start_layer: int = 0, out: str | os.PathLike | None = None, progress: bool = True,
                    seed: int = 0, proj_weight: float = 0.5, val_fraction: float = 0.25) -> LowRankSelector:
    """Fit the ALVTS low-rank selector of every layer to the full-rank score (model frozen).

    Starts from the truncated-SVD factors of each layer's q/k projections and minimises, with
    Adam, the squared error between the low-rank score S and the oracle score S* (both from
    :func:`selection_scores`, on the unpatched model's own layer inputs), relative to the
    oracle's scale, summed over ``samples``. Two guards against over-fitting a small
    calibration set: a data-aware projection term (``proj_weight`` times the relative error of
    the low-rank q/k against the full-rank q/k on the same tokens) and early stopping on a
    held-out ``val_fraction`` of the samples (the factors of the best validation step are kept,
    and step 0 is the SVD start, so validation never ends worse than SVD).

    Args:
        model: an unpatched supported model (its weights are not changed).
        samples: list of model input dicts (processor output), each a batch with images.
        rank: factor rank R (default: the per-model default).
        steps: optimisation steps per layer (each step visits every sample).
        start_layer: first layer to calibrate (layers before it are never pruned by ALVTS).
        out: directory to save the selector to (``selector.safetensors`` + ``selector.json``).

    Returns:
        The calibrated :class:`LowRankSelector`.
    """
    from tqdm.auto import tqdm

    from ..api import get_handle
    from ..models import adapter_for

    if get_handle(model) is not None:
        raise ValueError("calibrate_alvts needs the unpatched model: remove the patch first")
    if not samples:
        raise ValueError("calibrate_alvts needs at least one sample")
    adapter = adapter_for(model)
    rank = rank or adapter.default_alvts_rank()
    layers = list(range(start_layer, adapter.num_layers))
    selector = LowRankSelector.from_svd(adapter, rank, layers)
    param = next(model.parameters())
    selector.to(device=param.device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=gen).tolist()
    n_val = int(round(val_fraction * len(samples))) if len(samples) >= 4 else 0
    val_idx, train_idx = set(order[:n_val]), order[n_val:]
    bar = tqdm(total=len(layers) * steps, desc="calibrating ALVTS", disable=not progress)
    history = {}
    for li in layers:
        data = []
        for inputs in samples:
            x, (cos, sin) = _layer_inputs(model, adapter, inputs, li)
            valid, visual = _masks(model, inputs)
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = selection_scores(q, k, valid, visual).float()
            data.append((x, cos, sin, valid, visual, oracle, q.float(), k.float()))
        f = selector.layers[str(li)]
        # Optimise in float32 whatever the model dtype; write back in the model's dtype.
        params = {n: torch.nn.Parameter(getattr(f, n).detach().float().clone()) for n in ("q_a", "q_b", "k_a", "k_b")}
        opt = torch.optim.Adam(params.values(), lr=lr)

        def loss_of(i):
            x, cos, sin, valid, visual, oracle, q_full, k_full = data[i]
            q, k = _lowrank_qk(adapter, li, x, cos, sin, params)
            loss = _rel_mse(selection_scores(q, k, valid, visual), oracle, visual)
            if proj_weight:
                m = valid[:, None, :, None]
                for a, b in ((q, q_full), (k, k_full)):
                    loss = loss + proj_weight * ((a - b) ** 2 * m).sum() / ((b ** 2) * m).sum().clamp(min=1e-30) / 2
            return loss

        def val_loss():
            if not val_idx:
                return None
            with torch.no_grad():
                return sum(float(_rel_mse(selection_scores(*_lowrank_qk(adapter, li, *data[i][:3], params),
                                                           data[i][3], data[i][4]), data[i][5], data[i][4]))
                           for i in val_idx) / len(val_idx)

        best = (val_loss(), {n: p.detach().clone() for n, p in params.items()})
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for i in train_idx:
                loss = loss_of(i) / len(train_idx)
                loss.backward()
                total += loss.item()
            opt.step()
            v = val_loss()
            if v is not None and v < best[0]:
                best = (v, {n: p.detach().clone() for n, p in params.items()})
            losses.append(total)
            bar.update(1)
            bar.set_postfix(layer=li, loss=f"{total:.3g}", val=f"{v:.3g}" if v is not None else "-")
        history[li] = losses
        chosen = best[1] if best[0] is not None else {n: p.detach() for n, p in params.items()}
        with torch.no_grad():
            for n, p in chosen.items():
                getattr(f, n).copy_(p.to(getattr(f, n).dtype))
    bar.close()
    selector.to(dtype=param.dtype)
    selector.calibration_loss = history
    if out is not None:
        selector.save(out, meta={"model_type": adapter.model_type, "num_layers": adapter.num_layers,
                                 "hidden_size": adapter.hidden_size, "steps": steps, "lr": lr,
                                 "samples": len(samples), "start_layer": start_layer,
                                 "final_loss": {str(k): v[-1] for k, v in history.items()}})
    return selector


def _lowrank_qk(adapter, layer, x, cos, sin, params):
    """Differentiable low-rank q~/k~ (float32) for calibration."""
    mod = adapter.lm.layers[layer]
    attn = mod.self_attn
    with torch.no_grad():
        h = mod.input_layernorm(x).float()
    B, S, _ = h.shape
    d = adapter.head_dim
    q = (h @ params["q_a"].T) @ params["q_b"].T
    k = (h @ params["k_a"].T) @ params["k_b"].T
    if attn.q_proj.bias is not None:
        q = q + attn.q_proj.bias.float()
    if attn.k_proj.bias is not None:
        k = k + attn.k_proj.bias.float()
    q = q.view(B, S, -1, d).transpose(1, 2)
    k = k.view(B, S, -1, d).transpose(1, 2)
    return hf.apply_rotary(q, cos.float(), sin.float()), hf.apply_rotary(k, cos.float(), sin.float())
