"""The soft-pruned student: the hard pruning of GlimpsePrune relaxed to keep probabilities (an\nadditive ``log p`` attention bias), installed on a model as a runtime method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import hf
from ..runtime import PrefillResult
from ..vip import GlimpseModules


# --------------------------------------------------------------------------------------------
# The soft-pruned student (a Runtime method)
# --------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class SoftGlimpseStudent:
    """The model pruned by the VIP's soft keep mask (see the module docstring).

    Installed with a :class:`~token_prune.runtime.Runtime`; before each forward the trainer
    sets ``answer_mask`` ([B, S] bool, the teacher-forced answer tokens). After it, ``last``
    holds the VIP ``logits`` [N] (images concatenated), ``sizes`` (tokens per image) and the
    vision ``layout``.
    """

    name = "glimpse-train"

    def __init__(self, modules: GlimpseModules, layer: int, bias_floor: float = -30.0, checkpoint: bool = False,
                 normalise_to: float | None = None, temperature: float = 1.0):
        self.temperature = float(temperature)
        self.modules = modules
        self.layer = layer
        self.bias_floor = float(bias_floor)
        self.checkpoint = checkpoint
        self.normalise_to = normalise_to
        self.answer_mask: torch.Tensor | None = None
        self.last: dict | None = None

    def vision_layers(self) -> list[int]:
        return list(self.modules.config.vision_layers)

    def options(self) -> dict:
        return dict(layer=self.layer, bias_floor=self.bias_floor, checkpoint=self.checkpoint)

    def _call(self, layer, hidden, mask, cos, sin, text_pos, kwargs):
        def run(h, m, c, s):
            return hf.call_layer(layer, h, mask=m, rope=(c, s), text_pos=text_pos, cache=None, use_cache=False,
                                 **kwargs)

        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, hidden, mask, cos, sin, use_reentrant=False)
        return run(hidden, mask, cos, sin)

    def prefill(self, rt, lm, batch, cache, use_cache, kwargs):
        if cache is not None:
            raise ValueError("token_prune training forward: call the model with use_cache=False")
        adapter, ctx = rt.adapter, rt.ctx
        K, mods = self.layer, self.modules
        B, S, H = batch.hidden.shape
        dev = batch.hidden.device
        if self.answer_mask is None or tuple(self.answer_mask.shape) != (B, S):
            raise ValueError(f"SoftGlimpseStudent: answer_mask must be set to a [{B}, {S}] bool tensor before the call")
        answer = self.answer_mask.to(dev)
        valid = batch.valid
        prompt = valid & ~answer
        visual = batch.visual
        cdtype = _compute_dtype(batch.hidden)
        neg = torch.tensor(torch.finfo(cdtype).min, dtype=cdtype, device=dev)
        zero = torch.zeros((), dtype=cdtype, device=dev)
        layers = lm.layers
        gvec = mods.glimpse.all_layers(K).to(batch.hidden.dtype)  # [K+1, H]

        # -- pass 1: prompt + glimpse through layers 0..K-1, then layer K's q/k ----------------
        cols = torch.arange(S, device=dev)
        last = torch.where(prompt, cols, -1).amax(1)  # last prompt token of each row
        P = batch.pos.shape[0]
        gpos = batch.pos.gather(2, last.view(1, B, 1).expand(P, B, 1)).amax(0, keepdim=True) + 1
        pos1 = torch.cat([batch.pos, gpos.expand(P, B, 1)], 2)
        text_pos1 = None
        if batch.text_pos is not None:
            text_pos1 = torch.cat([batch.text_pos, batch.text_pos.gather(1, last[:, None]) + 1], 1)
        keys1 = torch.cat([prompt, prompt.new_ones(B, 1)], 1)  # answers and padding hidden
        c1 = torch.arange(S + 1, device=dev)
        allowed1 = (c1[None, :] <= c1[:, None])[None] & keys1[:, None, :]
        allowed1 = allowed1 | torch.eye(S + 1, dtype=torch.bool, device=dev)[None]
        mask1 = torch.where(allowed1, zero, neg)[:, None]
        hidden = torch.cat([batch.hidden, gvec[0].view(1, 1, H).expand(B, 1, H)], 1)
        cos1, sin1 = adapter.rotary(hidden, pos1)
        visual1 = torch.cat([visual, visual.new_zeros(B, 1)], 1)
        for i in range(K + 1):
            if i > 0:
                hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + gvec[i]], 1)
            if i == K:
                break
            hidden = self._call(layers[i], hidden, mask1, cos1, sin1, text_pos1, kwargs)
            if batch.deepstack is not None and i < len(batch.deepstack):
                hidden = hf.add_deepstack(hidden, visual1, batch.deepstack[i])
        q, k = adapter.project_qk(K, hidden, cos1, sin1)
        q = q[:, :, -1:]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, heads, 1, S+1]
        if mods.config.glimpse_score == "log_softmax":
            scores = scores.masked_fill(~allowed1[:, None, S:S + 1, :], float("-inf")).log_softmax(-1)
        attn_map = scores[:, :, 0, :S].transpose(1, 2)[visual]  # [N, heads]

        layout = ctx.image_grids
        if isinstance(layout, torch.Tensor):
            sizes, where = (layout[:, 0] * layout[:, 1]).tolist(), dict(grid_hw=layout.to(dev))
        else:
            sizes = [int(n) for n in layout[1]]
            where = dict(positions=layout[0].to(dev), lengths=sizes)
        n_vis = int(visual.sum())
        if sum(sizes) != n_vis:
            raise RuntimeError(f"token_prune: {n_vis} image tokens in the prompt but the image grids give {sum(sizes)}")
        wdtype = next(mods.parameters()).dtype
        conds = [c.to(wdtype) for c in ctx.vision_features]
        logits = mods.vip(attn_map.to(wdtype), conds, **where)  # [N]
        self.last = dict(logits=logits, sizes=sizes, layout=layout)

        # -- pass 2: the whole sequence through every layer with the soft keep bias ----------
        z = logits.float()
        if self.normalise_to is not None:
            z, _ = _normalise_logits(_standardise(z, sizes) / self.temperature, sizes, self.normalise_to)
        else:
            z = z / self.temperature
        logp = F.logsigmoid(z).clamp_min(self.bias_floor)
        key_bias = torch.zeros(B, S, dtype=logp.dtype, device=dev).masked_scatter(visual, logp).to(cdtype)
        allowed2 = (cols[None, :] <= cols[:, None])[None] & valid[:, None, :]
        allowed2 = allowed2 | torch.eye(S, dtype=torch.bool, device=dev)[None]
        biased = torch.where(allowed2, key_bias[:, None, :], neg)
        late = biased[:, None]  # layers K+1..: every query
        early = torch.where(answer[:, :, None], biased, torch.where(allowed2, zero, neg))[:, None]  # layers 0..K
        cos2, sin2 = adapter.rotary(batch.hidden, batch.pos)
        hidden = batch.hidden
        for i, layer in enumerate(layers):
            hidden = self._call(layer, hidden, early if i <= K else late, cos2, sin2, batch.text_pos, kwargs)
            hidden = batch.add_deepstack(i, hidden)
        stats = [{"visual_tokens": int(n)} for n in visual.sum(1).tolist()]
        return PrefillResult(hidden, batch, stats)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _keep_shift(z: torch.Tensor, sizes: list[int], target: float, iters: int = 60) -> torch.Tensor:
    """Per image, the c with mean(sigmoid(z + c)) == target (bisection; no gradient). [n_images]"""
    dev, dt = z.device, z.dtype
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev))
    n = torch.tensor(sizes, device=dev, dtype=dt)
    z = z.detach()
    lo = torch.full((len(sizes),), -float(z.max()) - 40.0, device=dev, dtype=dt)
    hi = torch.full_like(lo, -float(z.min()) + 40.0)
    for _ in range(iters):
        c = (lo + hi) / 2
        mean = torch.zeros_like(c).index_add_(0, ids, torch.sigmoid(z + c[ids])) / n
        above = mean > target
        hi = torch.where(above, c, hi)
        lo = torch.where(above, lo, c)
    return (lo + hi) / 2


def _standardise(z: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per image, (z - mean) / std (0 for a one-token image)."""
    out = []
    for t in _split(z, sizes):
        out.append((t - t.mean()) / (t.std(unbiased=False) + 1e-6) if t.numel() > 1 else t - t)
    return torch.cat(out) if out else z


def _global_shift(z: torch.Tensor, sizes: list[int], target: float, iters: int = 60) -> float:
    """The single c with mean over images of mean(sigmoid(z + c)) == target (bisection)."""
    parts = _split(z.detach(), sizes)
    lo, hi = -float(z.max()) - 40.0, -float(z.min()) + 40.0
    for _ in range(iters):
        c = (lo + hi) / 2
        mean = sum(float(torch.sigmoid(p + c).mean()) for p in parts) / len(parts)
        lo, hi = (lo, c) if mean > target else (c, hi)
    return (lo + hi) / 2


def _normalise_logits(z: torch.Tensor, sizes: list[int], target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each image's logits by c so that mean(sigmoid(z + c)) == target, with the exact
    first-order gradient of the shift (implicit function: dc/dz_j = -s'_j / sum s'), so the
    result depends only on the *relative* logits of an image. Returns (shifted z, c)."""
    c = _keep_shift(z, sizes, target)
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=z.device), torch.tensor(sizes, device=z.device))
    s = torch.sigmoid(z.detach() + c[ids])
    d = s * (1 - s)
    den = torch.zeros_like(c).index_add_(0, ids, d).clamp_min(1e-12)
    lin = -torch.zeros_like(c).index_add_(0, ids, d * z) / den
    return z + (c + lin - lin.detach())[ids], c


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes))
