"""Analytic cost model: FLOPs and bytes per stage of a vision-language model's first token and of a
decode step, unpatched and under GlimpsePrune / FastV / ALVTS.

The benchmark (:mod:`token_prune.bench`) prints these numbers beside every measurement, so that a
measured ratio can be read against what the arithmetic allows. Everything is per forward call of
a batch of ``batch`` identical prompts, one image each.

Counting conventions
--------------------
* A multiply-add is 2 FLOPs. Elementwise work (norms, activations, rotary, residual adds) is not
  counted, except where it is the stage (the ALVTS score's softmax).
* Decoder layer, ``n`` tokens: projections ``2 n (H q + 2 H kv + q H)`` (q = heads * head_dim,
  kv = kv_heads * head_dim), SwiGLU MLP ``2 n 3 H I``; attention core ``4 heads head_dim C`` with
  ``C`` the number of (query, key) pairs the layer evaluates: ``n (n + 1) / 2`` for a causal
  prefill from an empty cache, ``c + 1`` per query for a decode step on a cache of ``c``.
* Bytes: every weight read once per forward, the KV cache written once (prefill) or read once
  (decode), plus a coarse activation term (each main activation tensor written once and read
  once; flash-style attention assumed, so no ``n x n`` matrix is stored). Only the weight and
  KV terms are exact; prefill is compute-bound, decode is bound by those two terms.
* Qwen2.5-VL ViT: attention over windows of ``window_size / patch`` patches square in the window
  blocks, over the whole image in ``fullatt_block_indexes``; the 2x2 merger MLP
  ``4w -> 4w -> out``. CLIP: every encoder layer runs (HF computes all hidden states), the
  projector is ``w -> H -> H`` on the patch tokens. LLaVA-NeXT runs CLIP on every tile.
* Methods, with ``T`` text tokens, ``N`` visual tokens, ``k = ceil(f N)`` kept, ``L`` layers:
  ``glimpse``: layers ``0..K`` on ``T + N + 1`` tokens (the glimpse token), the glimpse map and
  the VIP, compaction of the hidden states and of the caches of layers ``0..K``, layers
  ``K+1..L-1`` on ``T + k`` tokens; every layer's cache then holds ``T + k`` tokens.
  ``fastv``: layers ``0..K`` on ``T + N``, the last-token score, layers after K on ``T + k``;
  caches: ``T + N`` up to K, ``T + k`` after. ``random``: FastV's shape without the score. ``alvts``: every layer from ``start_layer`` on
  processes ``T + k`` tokens and first runs the low-rank selector on all ``T + N`` (a fused
  attention forward + backward whose value-gradient is the score) plus a gather and a scatter of the hidden
  states. With ``skipped="drop"`` such a layer attends over and caches only the ``T + k``; with
  ``skipped="context"`` (the method's default) it also projects keys/values of the skipped
  ``N - k`` tokens, its ``T + k`` queries attend over all ``T + N`` (text counted as following
  the image, selected rows spread evenly), and its cache holds ``T + N``.
* The floor of the LM prefill ratio for pruning after layer K with keep fraction f, ignoring
  text tokens and the quadratic attention term: ``(K + 1 + (L - K - 1) f) / L``
  (:func:`prefill_floor`); for ALVTS it is f on the layers it prunes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = [
    "Cost",
    "LMSpec",
    "VisionSpec",
    "VIPSpec",
    "Arch",
    "arch_from_config",
    "prompt_layout",
    "kept_count",
    "prefill_floor",
    "lm_layer_cost",
    "lm_prefill_cost",
    "vision_cost",
    "decode_step_cost",
    "kv_lens",
    "estimate",
    "GPU_PEAKS",
    "gpu_peak",
    "roofline_ms",
]


@dataclass
class Cost:
    """FLOPs and bytes of one stage. ``flops`` is the sum of the four parts."""

    proj_flops: float = 0.0
    attn_flops: float = 0.0
    mlp_flops: float = 0.0
    other_flops: float = 0.0
    bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.proj_flops + self.attn_flops + self.mlp_flops + self.other_flops

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.proj_flops + other.proj_flops,
            self.attn_flops + other.attn_flops,
            self.mlp_flops + other.mlp_flops,
            self.other_flops + other.other_flops,
            self.bytes + other.bytes,
        )

    def scaled(self, k: float) -> "Cost":
        return Cost(self.proj_flops * k, self.attn_flops * k, self.mlp_flops * k, self.other_flops * k, self.bytes * k)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops"] = self.flops
        return d


def total(costs: dict[str, Cost]) -> Cost:
    out = Cost()
    for c in costs.values():
        out = out + c
    return out


# -- architecture ------------------------------------------------------------------------


@dataclass(frozen=True)
class LMSpec:
    """Decoder sizes. ``qkv_bias``: q/k/v projections have biases (Qwen2); ``head_norms``: per-head
    q/k RMSNorms (Qwen3).

    Sparse-MoE decoders (Qwen3-VL-30B-A3B): ``sparse_layers`` of the layers have ``experts``
    SwiGLU experts of width ``expert_intermediate`` and a router, of which ``experts_per_token``
    run for each token; the others have the dense ``intermediate`` MLP. FLOPs count the active
    experts only; parameters count all of them; weight bytes read count the experts a step's
    tokens reach (expected number under uniform routing).
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool = False
    tied_embeddings: bool = False
    head_norms: bool = False
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    sparse_layers: int = 0

    def _mlp_mean(self, dense: float, sparse: float) -> float:
        s = self.sparse_layers if self.experts else 0
        return ((self.layers - s) * dense + s * sparse) / self.layers

    @property
    def active_intermediate(self) -> float:
        """MLP width one token runs through, averaged over the layers."""
        return self._mlp_mean(self.intermediate, self.experts_per_token * self.expert_intermediate)

    def experts_reached(self, tokens: float) -> float:
        """Expected distinct experts of a sparse layer that ``tokens`` tokens route to."""
        if not self.experts:
            return 0.0
        return self.experts * (1.0 - (1.0 - self.experts_per_token / self.experts) ** max(tokens, 0.0))

    def read_layer_params(self, tokens: float) -> float:
        """Weights of one layer (mean over layers) read when ``tokens`` tokens go through it."""
        H = self.hidden
        if not self.experts:
            return self.layer_params()
        expert = 3 * H * self.expert_intermediate
        mlp = self._mlp_mean(3 * H * self.intermediate, self.experts_reached(tokens) * expert + H * self.experts)
        return self._attn_params() + mlp + 2 * H

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def _attn_params(self) -> int:
        H, q, kv = self.hidden, self.q_width, self.kv_width
        norms = 2 * self.head_dim if self.head_norms else 0  # per-head q/k RMSNorm weights
        return H * q + 2 * H * kv + q * H + ((q + 2 * kv) if self.qkv_bias else 0) + norms

    def layer_params(self) -> float:
        """Parameters of one layer (mean over the layers; every expert counted)."""
        H = self.hidden
        mlp = self._mlp_mean(3 * H * self.intermediate, self.experts * (3 * H * self.expert_intermediate + H))
        return self._attn_params() + mlp + 2 * H  # + two RMSNorm weights

    def params(self) -> int:
        """Decoder layers, final norm, embedding and LM head."""
        emb = self.vocab * self.hidden
        return round(self.layers * self.layer_params()) + self.hidden + emb + (0 if self.tied_embeddings else emb)

    def linear_flops_per_token(self) -> tuple[float, float]:
        """(projection, MLP) FLOPs of one token through one layer (MLP: the active experts and the
        router of a sparse layer; mean over the layers)."""
        H, q, kv = self.hidden, self.q_width, self.kv_width
        mlp = self._mlp_mean(3 * H * self.intermediate,
                             self.experts_per_token * 3 * H * self.expert_intermediate + H * self.experts)
        return 2.0 * (H * q + 2 * H * kv + q * H), 2.0 * mlp

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_width * dtype_bytes


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


@dataclass(frozen=True)
class VIPSpec:
    """GlimpsePrune's VIP: input width ``llm_heads``, ``n_cond`` blocks (see token_prune.vip)."""

    llm_heads: int
    vision_width: int
    hidden: int = 256
    cond: int = 512
    num_heads: int = 4
    mlp_ratio: int = 2
    n_cond: int = 4


@dataclass(frozen=True)
class Arch:
    family: str
    lm: LMSpec
    vision: VisionSpec
    vip: VIPSpec
    alvts_rank: int
    dtype_bytes: int = 2

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "lm": asdict(self.lm),
            "vision": asdict(self.vision),
            "vip": asdict(self.vip),
            "alvts_rank": self.alvts_rank,
            "dtype_bytes": self.dtype_bytes,
            "lm_params": self.lm.params(),
            "vision_params": self.vision.params(),
        }


def _moe_sizes(tc) -> dict:
    """The sparse-MoE fields of :class:`LMSpec` from a decoder config (none for a dense one)."""
    experts = getattr(tc, "num_experts", None) or 0
    if not experts:
        return {}
    step = getattr(tc, "decoder_sparse_step", 1) or 1
    dense = set(getattr(tc, "mlp_only_layers", None) or [])
    sparse = sum(1 for i in range(tc.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    return dict(experts=experts, experts_per_token=tc.num_experts_per_tok,
                expert_intermediate=tc.moe_intermediate_size, sparse_layers=sparse)


def arch_from_config(config, dtype_bytes: int = 2, alvts_rank: int | None = None) -> Arch:
    """An :class:`Arch` from the Hugging Face config of any supported family (its adapter
    describes the vision tower and the decoder's biases)."""
    from .models import adapter_class

    family = adapter_class(config.model_type)
    tc = config.text_config
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    lm = LMSpec(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        heads=heads,
        kv_heads=tc.num_key_value_heads or heads,
        head_dim=head_dim,
        intermediate=tc.intermediate_size,
        vocab=tc.vocab_size,
        qkv_bias=family.qkv_bias(config),
        tied_embeddings=bool(
            getattr(tc, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
        ),
        head_norms=family.head_norms(config),
        **_moe_sizes(tc),
    )
    vision = family.cost_vision_spec(config)
    vip = VIPSpec(llm_heads=heads, vision_width=vision.width)
    if alvts_rank is None:
        alvts_rank = family.alvts_rank_for(lm.hidden)
    return Arch(family=config.model_type, lm=lm, vision=vision, vip=vip, alvts_rank=alvts_rank,
                dtype_bytes=dtype_bytes)


# -- prompt layout -----------------------------------------------------------------------


def prompt_layout(config, image_hw: tuple[int, int], text_before: int, text_after: int,
                  video_frames: int | None = None) -> dict:
    """Tokens of one synthetic prompt (one image, or one video of ``video_frames`` frames of
    ``image_hw``) as :mod:`token_prune.bench` builds it.

    Returns ``{"text": T, "visual": N, "prompt": T + N, "vision_patches" | "tiles": ...}``, and
    ``"frame_groups"`` for a video.
    """
    from .tiny import prompt_layout as layout

    return layout(config, image_hw, text_before, text_after, video_frames=video_frames)


def kept_count(n: int, keep_ratio: float) -> int:
    """Visual tokens a ``keep_ratio`` keeps of ``n`` (the keep rule's ``ceil``)."""
    return min(n, math.ceil(keep_ratio * n - 1e-9))


def prefill_floor(layers: int, K: int | None, f: float, method: str = "glimpse", start_layer: int = 0) -> float:
    """Lower bound of the LM prefill cost ratio, linear terms only, text tokens ignored.

    ``(K + 1 + (L - K - 1) f) / L`` for pruning after layer K (GlimpsePrune, FastV);
    ``(s + (L - s) f) / L`` for ALVTS from layer s; 1 unpatched.
    """
    L = layers
    if method in ("none", None):
        return 1.0
    if method == "alvts":
        return (start_layer + (L - start_layer) * f) / L
    if K is None:
        raise ValueError("prefill_floor: K is needed for glimpse / fastv")
    return (K + 1 + (L - K - 1) * f) / L


# -- stages ------------------------------------------------------------------------------


def lm_layer_cost(lm: LMSpec, n: int, pairs: float, batch: int = 1, dtype_bytes: int = 2, weights: bool = True) -> Cost:
    """One decoder layer on ``n`` tokens per sample with ``pairs`` (query, key) pairs per sample."""
    proj, mlp = lm.linear_flops_per_token()
    attn = 4.0 * lm.heads * lm.head_dim * pairs
    H, I = lm.hidden, lm.active_intermediate
    act = 2.0 * n * dtype_bytes * (4 * H + 2 * lm.kv_width + 3 * I)
    kv = n * lm.kv_bytes_per_token(dtype_bytes)
    w = lm.read_layer_params(batch * n) * dtype_bytes if weights else 0
    return Cost(
        proj_flops=batch * n * proj, attn_flops=batch * attn, mlp_flops=batch * n * mlp, bytes=w + batch * (act + kv)
    )


def _causal_pairs(n: int) -> float:
    return n * (n + 1) / 2.0


def _vip_cost(arch: Arch, n_visual: int, K: int, batch: int) -> Cost:
    v, lm, b = arch.vip, arch.lm, arch.dtype_bytes
    N = n_visual
    h, c, qk = v.hidden, v.cond, v.hidden + v.cond
    glimpse_map = 2.0 * lm.heads * lm.head_dim * (N + 1)
    gvec = 2.0 * (K + 1) * lm.hidden * lm.hidden  # projection of the K+1 glimpse vectors (batch independent)
    per_block_proj = 2.0 * N * (c * v.vision_width + 2 * qk * qk + 2 * h * h)
    per_block_attn = 2.0 * N * N * qk + 2.0 * N * N * h
    per_block_mlp = 2.0 * N * 3 * h * h * v.mlp_ratio
    proj = 2.0 * N * lm.heads * h + v.n_cond * per_block_proj + 2.0 * N * h
    params = (
        lm.heads * h
        + h
        + v.n_cond
        * (v.vision_width * c + c + 2 * qk * qk + 2 * h * h + 2 * h + 3 * h * h * v.mlp_ratio + 2 * h * v.mlp_ratio + h)
        + h
        + 1
    )
    act = 2.0 * b * N * (v.n_cond * (v.vision_width + 2 * qk + 4 * h + 3 * h * v.mlp_ratio))
    return Cost(
        proj_flops=batch * proj + gvec,
        attn_flops=batch * (v.n_cond * per_block_attn + glimpse_map),
        mlp_flops=batch * v.n_cond * per_block_mlp,
        bytes=params * b + batch * act,
    )


def _selector_cost(arch: Arch, n: int, batch: int) -> Cost:
    """ALVTS selector of one layer on ``n`` tokens on a GPU: low-rank q~/k~, then the score as
    the value-gradient of one fused causal attention call (``selection_scores(impl="sdpa")``):
    forward ``q k^T`` and ``P v``, backward ``q k^T`` again, ``dO v^T``, ``P^T dO``, ``dS k``,
    ``dS^T q`` (seven ``n x n x d`` products per head over the causal half), no ``n x n`` matrix
    in memory."""
    lm, R, b = arch.lm, arch.alvts_rank, arch.dtype_bytes
    lowrank = 2.0 * n * (2 * lm.hidden * R + R * lm.q_width + R * lm.kv_width)
    pairs = _causal_pairs(n)
    scores = 7 * 2.0 * lm.heads * lm.head_dim * pairs
    softmax = 2 * 5.0 * lm.heads * pairs  # exp and row statistics, forward and backward
    # q, k (repeated to every head), v, out, dO read/written once or twice, dq, dk, dv written.
    io = 12.0 * n * lm.q_width * b
    weights = (2 * lm.hidden * R + R * lm.q_width + R * lm.kv_width) * b
    return Cost(
        proj_flops=batch * lowrank,
        attn_flops=batch * scores,
        other_flops=batch * softmax,
        bytes=weights + batch * (io + 2.0 * n * (lm.q_width + lm.kv_width) * b),
    )


def lm_prefill_cost(
    arch: Arch,
    text: int,
    visual: int,
    method: str = "none",
    *,
    keep_ratio: float = 1.0,
    K: int | None = None,
    start_layer: int = 0,
    batch: int = 1,
    kept: int | None = None,
    skipped: str = "context",
) -> dict[str, Cost]:
    """Stages of the language-model prefill (decoder layers and the method's own work; no LM head).

    Args:
        text, visual: tokens per sample; ``kept``: visual tokens kept (default ``ceil(f N)``).
        method: ``none``, ``glimpse``, ``fastv``, ``random`` or ``alvts``.
        skipped: ALVTS only, ``"context"`` or ``"drop"`` (see :mod:`token_prune.methods.alvts`).
    """
    lm, b = arch.lm, arch.dtype_bytes
    L = lm.layers
    n = text + visual
    k = kept if kept is not None else kept_count(visual, keep_ratio)
    m = text + k
    kvb = lm.kv_bytes_per_token(b)
    if method == "none":
        return {"layers": lm_layer_cost(lm, n, _causal_pairs(n), batch, b).scaled(L)}
    if method in ("glimpse", "fastv", "random"):
        if K is None:
            raise ValueError(f"{method}: K is needed")
        g = 1 if method == "glimpse" else 0
        full = n + g
        stages = {"layers_0_K": lm_layer_cost(lm, full, _causal_pairs(full), batch, b).scaled(K + 1)}
        if method == "glimpse":
            stages["vip"] = _vip_cost(arch, visual, K, batch)
        elif method == "fastv":
            stages["score"] = Cost(
                attn_flops=batch * 2.0 * lm.heads * lm.head_dim * n + 2.0 * batch * lm.hidden * lm.q_width,
                other_flops=batch * 5.0 * lm.heads * n,
                bytes=batch * n * kvb / 2,
            )
        else:  # random: one random number per visual token
            stages["score"] = Cost(other_flops=batch * visual, bytes=batch * visual * 4)
        # Gather of the hidden states (+ the caches of layers 0..K for glimpse): read all, write kept.
        cache_layers = (K + 1) if method == "glimpse" else 0
        stages["compact"] = Cost(bytes=batch * ((full + m) * lm.hidden * b + cache_layers * (full + m) * kvb))
        stages["layers_K1_L"] = (
            lm_layer_cost(lm, m, _causal_pairs(m), batch, b).scaled(L - K - 1) if L - K - 1 > 0 else Cost()
        )
        return stages
    if method == "alvts":
        s = start_layer
        stages = {}
        if s:
            stages["layers_before_start"] = lm_layer_cost(lm, n, _causal_pairs(n), batch, b).scaled(s)
        stages["select"] = _selector_cost(arch, n, batch).scaled(L - s)
        if skipped == "context":
            pairs = k * (visual + 1) / 2.0 + text * visual + _causal_pairs(text)
            layer = lm_layer_cost(lm, m, pairs, batch, b)
            skip = n - m  # K/V projections of the skipped rows: read their state, write their cache entries
            layer = layer + Cost(proj_flops=batch * skip * 2.0 * lm.hidden * 2 * lm.kv_width,
                                 bytes=batch * skip * (2 * lm.hidden * b + kvb))
            stages["layers"] = layer.scaled(L - s)
        elif skipped == "drop":
            stages["layers"] = lm_layer_cost(lm, m, _causal_pairs(m), batch, b).scaled(L - s)
        else:
            raise ValueError(f"skipped must be 'context' or 'drop', got {skipped!r}")
        # Gather of the processed rows, clone + scatter back into the full residual stream.
        stages["merge"] = Cost(bytes=batch * (L - s) * ((n + m) * lm.hidden * b + (2 * n + m) * lm.hidden * b))
        return stages
    raise ValueError(f"unknown method {method!r}")


def lm_head_cost(arch: Arch, batch: int = 1, tokens: int = 1) -> Cost:
    """Final-token logits (``logits_to_keep=1``)."""
    lm, b = arch.lm, arch.dtype_bytes
    return Cost(
        proj_flops=2.0 * batch * tokens * lm.hidden * lm.vocab,
        bytes=lm.hidden * lm.vocab * b + batch * tokens * lm.vocab * 4,
    )


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


def kv_lens(
    arch: Arch,
    text: int,
    visual: int,
    method: str = "none",
    *,
    keep_ratio: float = 1.0,
    K: int | None = None,
    start_layer: int = 0,
    kept: int | None = None,
    skipped: str = "context",
) -> list[int]:
    """Per-layer KV cache length of one sample right after prefill."""
    L = arch.lm.layers
    n = text + visual
    m = text + (kept if kept is not None else kept_count(visual, keep_ratio))
    if method == "none":
        return [n] * L
    if method == "glimpse":
        return [m] * L
    if method in ("fastv", "random"):
        return [n] * (K + 1) + [m] * (L - K - 1) if K + 1 < L else [n] * L
    if method == "alvts":
        return [n] * L if skipped == "context" else [n] * start_layer + [m] * (L - start_layer)
    raise ValueError(f"unknown method {method!r}")


def decode_step_cost(arch: Arch, kv: list[int], batch: int = 1, generated: int = 0) -> dict[str, Cost]:
    """One decode step (one new token per sample) on caches of ``kv[l] + generated`` tokens.

    Stages: ``weights`` (every decoder layer and the LM head, read once per step: the floor of a
    memory-bound step), ``kv`` (reading each layer's cache, writing one entry) and ``attn``.
    """
    lm, b = arch.lm, arch.dtype_bytes
    proj, mlp = lm.linear_flops_per_token()
    kvb = lm.kv_bytes_per_token(b)
    ctx = sum(c + generated for c in kv)
    layers = Cost(
        proj_flops=batch * lm.layers * proj + 2.0 * batch * lm.hidden * lm.vocab,
        mlp_flops=batch * lm.layers * mlp,
        bytes=(lm.layers * lm.read_layer_params(batch) + lm.hidden + lm.hidden * lm.vocab) * b,
    )
    cache = Cost(
        attn_flops=4.0 * lm.heads * lm.head_dim * batch * (ctx + lm.layers), bytes=batch * (ctx * kvb + lm.layers * kvb)
    )
    return {"weights": layers, "kv": cache}


# -- whole estimates ---------------------------------------------------------------------


def estimate(
    arch: Arch,
    layout: dict,
    image_hw,
    method: str = "none",
    *,
    keep_ratio: float = 1.0,
    K: int | None = None,
    start_layer: int = 0,
    batch: int = 1,
    decode_tokens: int = 32,
    kept: int | None = None,
    gpu: str | None = None,
    skipped: str = "context",
    peak: dict | None = None,
) -> dict:
    """Every number the benchmark prints for one setting (JSON-ready).

    Returns stage costs of the vision tower, the LM prefill and one decode step (taken at the
    middle of a ``decode_tokens`` decode), their totals, the KV cache, the floor, and roofline
    times when ``gpu`` names a known device or ``peak`` gives a machine's ``{"name", "flops",
    "bandwidth"}`` (e.g. a CPU's, measured by the benchmark).
    """
    T, N = layout["text"], layout["visual"]
    vis = vision_cost(arch, image_hw, batch, tiles=layout.get("tiles"), frame_groups=layout.get("frame_groups", 1))
    pre = lm_prefill_cost(
        arch, T, N, method, keep_ratio=keep_ratio, K=K, start_layer=start_layer, batch=batch, kept=kept,
        skipped=skipped,
    )
    head = lm_head_cost(arch, batch)
    kv = kv_lens(arch, T, N, method, keep_ratio=keep_ratio, K=K, start_layer=start_layer, kept=kept,
                 skipped=skipped)
    dec = decode_step_cost(arch, kv, batch, generated=decode_tokens // 2)
    k = kept if kept is not None else kept_count(N, keep_ratio)
    out = {
        "method": method,
        "K": K,
        "keep_ratio": keep_ratio,
        "start_layer": start_layer,
        "skipped": skipped if method == "alvts" else None,
        "batch": batch,
        "text_tokens": T,
        "visual_tokens": N,
        "kept_tokens": k,
        "vision": {s: c.to_dict() for s, c in vis.items()},
        "lm_prefill": {s: c.to_dict() for s, c in pre.items()},
        "lm_head": head.to_dict(),
        "decode_step": {s: c.to_dict() for s, c in dec.items()},
        "totals": {
            "vision_flops": total(vis).flops,
            "lm_prefill_flops": total(pre).flops,
            "lm_prefill_attn_flops": total(pre).attn_flops,
            "lm_prefill_mlp_flops": total(pre).mlp_flops,
            "lm_prefill_bytes": total(pre).bytes,
            "ttft_flops": total(vis).flops + total(pre).flops + head.flops,
            "decode_step_flops": total(dec).flops,
            "decode_step_bytes": total(dec).bytes,
        },
        "kv_len": kv,
        "kv_cache_bytes": batch * sum(kv) * arch.lm.kv_bytes_per_token(arch.dtype_bytes),
        "weights_bytes": (arch.lm.params() + arch.vision.params()) * arch.dtype_bytes,
        "floor": prefill_floor(arch.lm.layers, K, keep_ratio, method, start_layer),
    }
    if peak is None:
        peak = gpu_peak(gpu) if gpu else None
    if peak is not None:
        out["roofline_ms"] = {
            "vision": roofline_ms(vis.values(), peak),
            "lm_prefill": roofline_ms(pre.values(), peak),
            "decode_step": roofline_ms(dec.values(), peak),
            "device": peak["name"],
        }
    return out


def ratios(est: dict, base: dict) -> dict:
    """Model ratios of a setting against the unpatched estimate, with the floor beside them."""
    t, bt = est["totals"], base["totals"]
    return {
        "lm_prefill_flops": t["lm_prefill_flops"] / bt["lm_prefill_flops"],
        "ttft_flops": t["ttft_flops"] / bt["ttft_flops"],
        "decode_step_bytes": t["decode_step_bytes"] / bt["decode_step_bytes"],
        "kv_cache_bytes": est["kv_cache_bytes"] / base["kv_cache_bytes"] if base["kv_cache_bytes"] else None,
        "floor": est["floor"],
    }


#: Dense bf16 tensor-core peak and memory bandwidth of common devices (vendor datasheets).
GPU_PEAKS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),
    ("H200", 989e12, 4.8e12),
    ("GH200", 989e12, 4.0e12),
    ("A100", 312e12, 2.0e12),
    ("L40S", 362e12, 0.864e12),
    ("RTX 4090", 165e12, 1.008e12),
]


def gpu_peak(name: str | None) -> dict | None:
    """``{"name", "flops", "bandwidth"}`` of the first :data:`GPU_PEAKS` entry in ``name``."""
    if not name:
        return None
    for key, flops, bw in GPU_PEAKS:
        if key.lower() in name.lower():
            return {"name": key, "flops": flops, "bandwidth": bw}
    return None


def roofline_ms(costs, peak: dict) -> float:
    """Sum over stages of ``max(flops / peak, bytes / bandwidth)``, in ms: a lower bound."""
    return sum(max(c.flops / peak["flops"], c.bytes / peak["bandwidth"]) for c in costs) * 1e3
