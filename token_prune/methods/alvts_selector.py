"""ALVTS's selector: per layer, a cheap stand-in for the layer's own attention that scores every
visual token (mean attention received from the visual queries times from the text queries).

Two forms, both calibratable (:func:`token_prune.alvts_calibration.calibrate_alvts`), both scored
by the fused two-pass op ``causal_attention_received`` (no ``n x n`` matrix):

* ``"group_rope"`` (default): one rank-space logit map per KV group. With GQA the head-summed
  logit of a group is exactly ``(sum_{h in g} q_h) . k_g``; rotary turns dims ``f`` and
  ``f + d/2`` of a head as one complex number at frequency ``f``, so frequency f's share of that
  logit is ``Re(e^{i w_f (p - s)} (a_f . x_p) conj(b_f . x_s))`` with complex rows ``a_f`` (the
  group's query rows summed) and ``b_f`` (its key rows), biases as an input column of ones. A
  rank-R selector keeps ``R / kv_heads`` real dims per group: the ``R / (2 kv_heads)``
  frequencies with the largest ``|a_f| |b_f|`` (the singular value of that frequency's rank-one
  map), each as a (real, imaginary) pair rotated with the layer's own cos/sin at its frequency.
  At ``R = kv_heads * head_dim`` it is the exact group-summed score; the score differs from the
  per-head one only by taking one softmax per group. Cost per layer: projections ``2 n H 2R``,
  score ``4 R`` FLOPs and ``2 kv_heads`` exps per causal (query, key) pair.
* ``"full_width"``: rank-R factors of ``q_proj`` and ``k_proj`` (truncated SVD), expanded back
  to every head's q and k; one softmax per head. Its score costs ``4 heads head_dim`` FLOPs per
  pair whatever R is, about as much as the layer's own attention (kept for comparison).

The study behind the choice is bench/NOTES.md, "ALVTS score at its floor".
"""

from __future__ import annotations

import json
import math
import os
import weakref

import torch
import torch.nn.functional as F

from .. import _ops, hf
from ..models.base import head_norm
from ..reference import causal_attention_received_ref

FORMAT = "token_prune.alvts_selector"
SELECTOR_FORMS = ("group_rope", "full_width")
DEFAULT_FORM = "group_rope"
_SVD_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def check_form(form) -> str:
    """``form`` if it names a selector form, else a ValueError/TypeError that lists them."""
    if not isinstance(form, str):
        raise TypeError(f"selector_form must be a string, one of {SELECTOR_FORMS}, got {type(form).__name__}")
    if form not in SELECTOR_FORMS:
        raise ValueError(f"selector_form must be one of {SELECTOR_FORMS}, got {form!r}")
    return form


def group_rope_rank(family_rank: int, hidden: int, kv_heads: int, head_dim: int) -> int:
    """Default rank of the per-group map: half the exact width ``kv_heads * head_dim`` (the
    published 256 of Qwen2.5-VL-7B and 128 of the 3B are exactly that), never below the family's
    full-width rank nor above a quarter of the hidden size (MHA models, where the exact width is
    the hidden size), rounded up to whole complex dims per group."""
    exact = kv_heads * head_dim
    r = min(max(family_rank, exact // 2), exact, max(1, hidden // 4))
    step = 2 * kv_heads
    return max(step, -(-r // step) * step)


def received_score(q: torch.Tensor, k: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """ALVTS's score ``(received from visual / n_visual) * (received from text / n_text)``.

    The fused op (its CPU or CUDA kernel) unless a gradient is wanted or the kernels are turned
    off (``TOKEN_PRUNE_KERNELS=0``); then the plain PyTorch reference, which is differentiable.

    Args:
        q: [B, Hq, S, D]; k: [B, Hk, S, D] (Hq % Hk == 0; any strides).
        visual, valid: [B, S] bool (``valid`` None: no padding).
        scale: logit scale.

    Returns:
        [B, S] float32 (float64 for float64 inputs); meaningful at visual positions.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not needs_grad and _ops.kernels_enabled():
        return _ops.alvts_score(q, k, visual, valid, scale=scale)
    rec = causal_attention_received_ref(q, k, visual, valid, scale)
    real = torch.ones_like(visual) if valid is None else valid
    n_vis = (visual & real).sum(1, keepdim=True).clamp(min=1).to(rec.dtype)
    n_txt = (~visual & real).sum(1, keepdim=True).clamp(min=1).to(rec.dtype)
    return (rec[:, 0] / n_vis) * (rec[:, 1] / n_txt)


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
    """Base of the selector forms: per-layer parameters in ``layers[str(l)]``, the score, save
    and load. ``LowRankSelector.load(path)`` returns the form the directory holds."""

    form: str = ""
    #: parameter name -> shape as a function of (adapter, rank)
    param_shapes: dict = {}

    def __init__(self, factors: dict[int, dict[str, torch.Tensor]], rank: int):
        super().__init__()
        self.rank = rank
        self.layers = torch.nn.ModuleDict()
        for layer, f in factors.items():
            m = torch.nn.Module()
            for name, t in f.items():
                if t.is_floating_point():
                    m.register_parameter(name, torch.nn.Parameter(t.detach().clone(), requires_grad=False))
                else:
                    m.register_buffer(name, t.detach().clone())
            self.layers[str(layer)] = m

    # -- what a form says ------------------------------------------------------------------
    @classmethod
    def from_weights(cls, adapter, rank: int, layers: list[int]) -> "LowRankSelector":
        """The SVD start: factors of each layer's own q/k projections."""
        raise NotImplementedError

    @classmethod
    def check_rank(cls, adapter, rank: int) -> None:
        """Raise a ValueError when ``rank`` does not fit the form on this model."""

    def qk(self, adapter, layer: int, hidden: torch.Tensor, cos, sin, params: dict | None = None,
           normed: torch.Tensor | None = None):
        """(q~ [B, maps, S, D], k~ [B, kv maps, S, D]) of ``hidden`` [B, S, H] (the layer's input),
        rotary applied; ``params`` overrides the layer's parameters (calibration); ``normed``: the
        layer's input norm of ``hidden`` when the caller has it already."""
        raise NotImplementedError

    def scale(self, adapter) -> float:
        """Logit scale of q~ . k~."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def has(self, layer: int) -> bool:
        return str(layer) in self.layers

    def layer_params(self, layer: int) -> dict[str, torch.Tensor]:
        m = self.layers[str(layer)]
        return {n: p for n, p in m.named_parameters()}

    def scores(self, adapter, layer: int, hidden: torch.Tensor, cos, sin, valid: torch.Tensor | None,
               visual: torch.Tensor, params: dict | None = None, normed: torch.Tensor | None = None) -> torch.Tensor:
        """ALVTS score [B, S] of every token before decoder layer ``layer``.

        Args:
            hidden: [B, S, H] the layer's input; cos, sin: [B, S, head_dim] its rotary tables.
            valid: [B, S] bool real tokens, or None (no padding); visual: [B, S] bool.
            params: differentiable replacements of the layer's parameters (calibration).
            normed: [B, S, H] ``input_layernorm(hidden)`` of layer ``layer``, if the caller computed
                it (the ALVTS layer reuses it for its keys and values).
        """
        q, k = self.qk(adapter, layer, hidden, cos, sin, params, normed)
        return received_score(q, k, visual, valid, self.scale(adapter))

    def save(self, path, meta: dict | None = None) -> None:
        """Write ``selector.safetensors`` + ``selector.json`` into directory ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {f"layers.{l}.{n}": t.detach().contiguous().cpu() for l, m in self.layers.items()
                   for n, t in list(m.named_parameters()) + list(m.named_buffers())}
        save_file(tensors, os.path.join(path, "selector.safetensors"))
        info = {"format": FORMAT, "version": 2, "form": self.form, "rank": self.rank,
                "layers": sorted(int(k) for k in self.layers)}
        info.update(meta or {})
        with open(os.path.join(path, "selector.json"), "w") as f:
            json.dump(info, f, indent=2)

    @classmethod
    def load(cls, path) -> tuple["LowRankSelector", dict]:
        """(selector of the form saved in directory ``path``, its selector.json)."""
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
        form = info.get("form", "full_width")  # version 1 files predate the per-group form
        if form not in SELECTOR_FORMS:
            raise ValueError(f"ALVTS selector: {cfg_path} has form {form!r}; this release knows {SELECTOR_FORMS}")
        factors: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in load_file(w_path).items():
            _, layer, name = key.split(".")
            factors.setdefault(int(layer), {})[name] = t
        return selector_class(form)(factors, info["rank"]), info

    def check_compatible(self, adapter) -> None:
        """Raise a ValueError when the selector was made for a model of other sizes."""
        self.check_rank(adapter, self.rank)
        shapes = self.expected_shapes(adapter, self.rank)
        for layer, m in self.layers.items():
            if int(layer) >= adapter.num_layers:
                raise ValueError(f"ALVTS selector has layer {layer} but the model has {adapter.num_layers} layers")
            for name, shape in shapes.items():
                t = getattr(m, name, None)
                got = None if t is None else tuple(t.shape)
                if got != shape:
                    raise ValueError(f"ALVTS selector layers.{layer}.{name} has shape {got}, the model needs {shape}")

    @classmethod
    def expected_shapes(cls, adapter, rank: int) -> dict[str, tuple]:
        raise NotImplementedError


class FullWidthSelector(LowRankSelector):
    """Rank-R factors of ``q_proj`` / ``k_proj``: ``factors[l]`` holds ``q_a`` [R, H],
    ``q_b`` [heads*d, R], ``k_a`` [R, H], ``k_b`` [kv_heads*d, R]; q~ and k~ are every head's
    full-width q and k, one softmax per head."""

    form = "full_width"

    @classmethod
    def from_weights(cls, adapter, rank: int, layers: list[int]) -> "FullWidthSelector":
        factors = {}
        for li in layers:
            attn = adapter.lm.layers[li].self_attn
            f = {}
            for name, proj in (("q", attn.q_proj), ("k", attn.k_proj)):
                key = (rank, proj.weight._version, proj.weight.data_ptr())
                hit = _SVD_CACHE.get(proj)
                if hit is None or hit[0] != key:
                    # a family whose q_proj also makes an output gate factors only its query rows
                    weight = adapter.query_projection(attn)[0] if name == "q" else proj.weight
                    hit = (key, svd_factors(weight, rank))
                    _SVD_CACHE[proj] = hit
                f[f"{name}_a"], f[f"{name}_b"] = hit[1]
            factors[li] = f
        return cls(factors, rank)

    @classmethod
    def random(cls, adapter, rank: int, layers: list[int], generator, device, dtype) -> "FullWidthSelector":
        """Random factors of the right sizes (timing runs, where the values do not matter)."""
        H, d = adapter.hidden_size, adapter.head_dim
        rnd = _randn(generator, device, dtype)
        return cls({l: {"q_a": rnd(rank, H, std=H ** -0.5), "q_b": rnd(adapter.num_heads * d, rank, std=rank ** -0.5),
                        "k_a": rnd(rank, H, std=H ** -0.5), "k_b": rnd(adapter.num_kv_heads * d, rank, std=rank ** -0.5)}
                    for l in layers}, rank)

    @classmethod
    def expected_shapes(cls, adapter, rank: int) -> dict[str, tuple]:
        H, d = adapter.hidden_size, adapter.head_dim
        return {"q_a": (rank, H), "k_a": (rank, H), "q_b": (adapter.num_heads * d, rank),
                "k_b": (adapter.num_kv_heads * d, rank)}

    def qk(self, adapter, layer: int, hidden: torch.Tensor, cos, sin, params: dict | None = None,
           normed: torch.Tensor | None = None):
        """q~ [B, heads, S, d] and k~ [B, kv_heads, S, d]."""
        f = params if params is not None else self.layer_params(layer)
        mod = adapter.lm.layers[layer]
        attn = mod.self_attn
        h = mod.input_layernorm(hidden) if normed is None else normed
        dt = f["q_a"].dtype if params is not None else h.dtype
        h = h.to(dt)
        B, S, _ = h.shape
        d = adapter.head_dim
        q = (h @ f["q_a"].T.to(dt)) @ f["q_b"].T.to(dt)
        k = (h @ f["k_a"].T.to(dt)) @ f["k_b"].T.to(dt)
        q_bias = adapter.query_projection(attn)[1]
        if q_bias is not None:
            q = q + q_bias.to(dt)
        if attn.k_proj.bias is not None:
            k = k + attn.k_proj.bias.to(dt)
        q = head_norm(attn, "q", q.view(B, S, -1, d)).to(dt).transpose(1, 2)
        k = head_norm(attn, "k", k.view(B, S, -1, d)).to(dt).transpose(1, 2)
        cos, sin = cos.to(dt), sin.to(dt)
        return hf.apply_rotary(q, cos, sin), hf.apply_rotary(k, cos, sin)

    def scale(self, adapter) -> float:
        return 1.0 / math.sqrt(adapter.head_dim)


class GroupRopeSelector(LowRankSelector):
    """One rotary-aware rank-space map per KV group (see the module docstring). ``factors[l]``
    holds ``q_weight`` / ``k_weight`` [R, H] and ``q_bias`` / ``k_bias`` [R] (group-major; in
    group g, dims ``j`` and ``r/2 + j`` of its ``r = R / kv_heads`` are the real and imaginary
    part of one component) and ``freq`` [kv_heads, r/2] int64 (each component's rotary frequency)."""

    form = "group_rope"

    @classmethod
    def check_rank(cls, adapter, rank: int) -> None:
        if has_head_norms(adapter):
            raise ValueError("selector_form='group_rope' needs q and k linear in the layer's input, but this "
                             "decoder normalises them per head (q_norm / k_norm); use selector_form='full_width'")
        g, exact = adapter.num_kv_heads, adapter.num_kv_heads * adapter.head_dim
        if rank % (2 * g) or rank > exact:
            raise ValueError(f"rank={rank} does not fit the group_rope selector of this model: it needs a multiple of "
                             f"2 * kv_heads = {2 * g} up to kv_heads * head_dim = {exact} (the exact group score)")

    @classmethod
    def expected_shapes(cls, adapter, rank: int) -> dict[str, tuple]:
        H = adapter.hidden_size
        return {"q_weight": (rank, H), "q_bias": (rank,), "k_weight": (rank, H), "k_bias": (rank,),
                "freq": (adapter.num_kv_heads, rank // adapter.num_kv_heads // 2)}

    @classmethod
    def from_weights(cls, adapter, rank: int, layers: list[int]) -> "GroupRopeSelector":
        cls.check_rank(adapter, rank)
        factors = {}
        for li in layers:
            attn = adapter.lm.layers[li].self_attn
            key = ("group_rope", rank, attn.q_proj.weight._version, attn.q_proj.weight.data_ptr(),
                   attn.k_proj.weight._version, attn.k_proj.weight.data_ptr())
            hit = _SVD_CACHE.get(attn)
            if hit is None or hit[0] != key:
                hit = (key, _group_rope_factors(adapter, attn, rank))
                _SVD_CACHE[attn] = hit
            factors[li] = hit[1]
        return cls(factors, rank)

    @classmethod
    def random(cls, adapter, rank: int, layers: list[int], generator, device, dtype) -> "GroupRopeSelector":
        """Random maps of the right sizes (timing runs, where the values do not matter)."""
        cls.check_rank(adapter, rank)
        H, g, half = adapter.hidden_size, adapter.num_kv_heads, adapter.head_dim // 2
        rnd = _randn(generator, device, dtype)
        per = rank // g // 2

        def freq():
            return torch.stack([torch.randperm(half, generator=generator, device=device)[:per] for _ in range(g)])

        return cls({l: {"q_weight": rnd(rank, H, std=H ** -0.5), "q_bias": rnd(rank, std=0.1),
                        "k_weight": rnd(rank, H, std=H ** -0.5), "k_bias": rnd(rank, std=0.1), "freq": freq()}
                    for l in layers}, rank)

    def qk(self, adapter, layer: int, hidden: torch.Tensor, cos, sin, params: dict | None = None,
           normed: torch.Tensor | None = None):
        """q~, k~ [B, kv_heads, S, R / kv_heads] (views of one [B, S, 2R] tensor)."""
        m = self.layers[str(layer)]
        f = params if params is not None else self.layer_params(layer)
        h = adapter.lm.layers[layer].input_layernorm(hidden) if normed is None else normed
        dt = f["q_weight"].dtype if params is not None else h.dtype
        h = h.to(dt)
        B, S, _ = h.shape
        g = adapter.num_kv_heads
        # One product of width 2R instead of two of width R: thin products run far below a
        # CPU's peak.
        qk = F.linear(h, torch.cat([f["q_weight"], f["k_weight"]]).to(dt), torch.cat([f["q_bias"], f["k_bias"]]).to(dt))
        # q~ and k~ of a group turn at the same frequencies: one rotation for both.
        qk = hf.rotate_at_frequencies(qk.view(B, S, 2 * g, -1), cos.to(dt), sin.to(dt), m.freq.repeat(2, 1))
        q, k = qk.view(B, S, 2, g, -1).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2)

    def scale(self, adapter) -> float:
        # The group's logit is the mean over its query heads of q_h . k_g / sqrt(d).
        return 1.0 / (math.sqrt(adapter.head_dim) * (adapter.num_heads // adapter.num_kv_heads))


def _group_rope_factors(adapter, attn, rank: int) -> dict[str, torch.Tensor]:
    """Per KV group and rotary frequency f, the rank-one complex map ``a_f conj(b_f)^T`` (a_f: the
    group's query rows of frequency f summed over its heads, b_f: its key rows; bias as the last
    input column), split evenly as sqrt of its singular value ``|a_f| |b_f|`` on both sides; the
    ``R / (2 kv_heads)`` largest per group, as (real, imaginary) columns."""
    heads, g, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    wq, wk = [torch.cat([p.weight.detach().double(),
                         (p.bias.detach().double() if p.bias is not None
                          else torch.zeros(p.weight.shape[0], dtype=torch.float64, device=p.weight.device))[:, None]], 1)
              for p in (attn.q_proj, attn.k_proj)]
    cq = hf.rotary_pairs(wq.view(heads, d, -1))  # [heads, d/2, H+1] complex
    ck = hf.rotary_pairs(wk.view(g, d, -1))  # [g, d/2, H+1]
    a = cq.view(g, heads // g, d // 2, -1).sum(1)  # [g, d/2, H+1]
    b = ck
    na, nb = a.abs().pow(2).sum(-1).sqrt(), b.abs().pow(2).sum(-1).sqrt()  # [g, d/2]
    sigma = na * nb
    per = rank // g // 2
    top = sigma.topk(per, dim=1).indices.sort(dim=1).values  # [g, per]
    ratio = (nb / na.clamp(min=1e-300)).sqrt()
    u = a * ratio[..., None]
    w = b * (1.0 / ratio.clamp(min=1e-300))[..., None]
    zero = sigma <= 0
    u[zero], w[zero] = 0, 0
    idx = top[..., None].expand(-1, -1, a.shape[-1])
    u, w = u.gather(1, idx), w.gather(1, idx)  # [g, per, H+1]
    # x^T M y = Re((u . x) conj(w . y)) for real x, y: q~ = (Re u . x, Im u . x), k~ likewise.
    pq = torch.cat([u.real, u.imag], 1).reshape(rank, -1)  # [g * 2per, H+1], group-major
    pk = torch.cat([w.real, w.imag], 1).reshape(rank, -1)
    dtype = attn.q_proj.weight.dtype
    return {"q_weight": pq[:, :-1].to(dtype), "q_bias": pq[:, -1].to(dtype),
            "k_weight": pk[:, :-1].to(dtype), "k_bias": pk[:, -1].to(dtype), "freq": top}


def layer_cost(lm, n: int, form: str, rank: int, dtype_bytes: int = 2, batch: int = 1, passes: int = 2):
    """FLOPs, exps and bytes of one layer's selector on ``n`` tokens per sample, as it runs:
    a :class:`token_prune.costmodel.Cost` (``lm``: its ``LMSpec``).

    Both forms: the layer's input norm (not counted), projections to the rank space, rotary (not
    counted), then the fused score ``causal_attention_received`` over the ``P = n (n+1)/2`` causal
    pairs. Its CUDA kernel (``passes=2``) makes two passes: pass 1 forms every logit (``2 W`` FLOPs
    per pair, ``W`` the summed width of the maps) and one exp per pair and softmax for the row
    statistics; pass 2 forms the logits again and one exp per pair and softmax for the column
    sums. So ``4 W P`` FLOPs and ``2 M P`` exps, ``M`` the number of softmaxes (maps). Its CPU
    kernel (``passes=1``) holds a strip of query rows against all their keys, so it forms each
    logit and exp once: ``2 W P`` FLOPs and ``M P`` exps. No ``n x n`` matrix in memory either way.

    * ``group_rope``: ``q~ = norm(x) W_q^T + b_q`` and likewise ``k~`` to rank R each
      (``2 n H 2R``); ``W = R`` (the ``kv_heads`` maps of ``R / kv_heads`` dims), ``M = kv_heads``.
    * ``full_width``: rank-R factors expanded to every head (``2 n (2 H R + R q + R kv)``, q/kv the
      query/key widths); ``W = heads * head_dim`` (one logit per query head), ``M = heads``.
    """
    from ..costmodel import Cost

    b, H, R = dtype_bytes, lm.hidden, rank
    pairs = n * (n + 1) / 2.0
    if form == "group_rope":
        proj_params = 2 * (H * R + R)
        proj = 2.0 * n * H * 2 * R
        width, maps, qk_width = R, lm.kv_heads, 2 * R
    elif form == "full_width":
        proj_params = 2 * H * R + R * lm.q_width + R * lm.kv_width
        proj = 2.0 * n * (2 * H * R + R * lm.q_width + R * lm.kv_width)
        width, maps, qk_width = lm.q_width, lm.heads, lm.q_width + lm.kv_width
    else:
        raise ValueError(f"selector form must be 'group_rope' or 'full_width', got {form!r}")
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 (CPU kernel) or 2 (CUDA kernel), got {passes!r}")
    # Input read once, q~/k~ written once and read by each pass, the [2, n] sums written.
    io = n * H * b + (1.0 + 2 * passes) * n * qk_width * b + 2 * n * 4
    return Cost(proj_flops=batch * proj, attn_flops=batch * 2.0 * passes * width * pairs,
                exps=batch * float(passes) * maps * pairs, bytes=proj_params * b + batch * io)


def _randn(generator, device, dtype):
    def rnd(*shape, std):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).mul_(std).to(dtype)
    return rnd


def selector_class(form: str) -> type[LowRankSelector]:
    """The selector class of a form name."""
    return {"group_rope": GroupRopeSelector, "full_width": FullWidthSelector}[check_form(form)]


def has_head_norms(adapter) -> bool:
    """Whether the model's decoder normalises queries and keys per head (then q.k is not a
    bilinear map of the layer's input and the per-group form does not apply)."""
    return bool(adapter.head_norms(adapter.model.config))


def default_form(adapter) -> str:
    """The selector form a model gets when none is asked for: ``group_rope``, or ``full_width``
    on decoders with per-head q/k norms."""
    return "full_width" if has_head_norms(adapter) else DEFAULT_FORM


def default_rank(adapter, form: str) -> int:
    """The rank a form uses on this model when none is given."""
    family_rank = adapter.default_alvts_rank()
    if check_form(form) == "full_width":
        return family_rank
    return group_rope_rank(family_rank, adapter.hidden_size, adapter.num_kv_heads, adapter.head_dim)


__all__ = ["SELECTOR_FORMS", "DEFAULT_FORM", "LowRankSelector", "FullWidthSelector", "GroupRopeSelector",
           "check_form", "default_form", "default_rank", "layer_cost", "group_rope_rank", "has_head_norms", "received_score", "selector_class", "svd_factors"]
