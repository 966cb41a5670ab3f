"""Analytic cost model: FLOPs and bytes per stage of a vision-language model's first token and of a
decode step, unpatched and under GlimpsePrune / FastV / ALVTS.

The benchmark (:mod:`token_prune.bench`) prints these numbers beside every measurement, so that a
measured ratio can be read against what the arithmetic allows. Everything is per forward call of
a batch of ``batch`` identical prompts, one image each.

Counting conventions
--------------------
* A multiply-add is 2 FLOPs. Elementwise work (norms, activations, rotary, residual adds) is not
  counted, except FastV's last-token softmax (its whole stage); the exponentials of the ALVTS
  score are counted separately (``Cost.exps``).
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
  processes ``T + k`` tokens and first runs the selector on all ``T + N`` (projections to the
  rank space, then the fused two-pass score; :func:`selector_layer_cost` per form) plus a gather
  and a scatter of the hidden states. With ``skipped="drop"`` such a layer attends over and caches only the ``T + k``; with
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
    "selector_layer_cost",
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
    """FLOPs and bytes of one stage. ``flops`` is the sum of the four parts; ``exps`` (the
    exponentials of a softmax the stage evaluates) is counted beside them, not in them.

    ``rows``: the rows (tokens of the whole batch) of the weight products that dominate the
    stage's FLOPs, 0 when unknown. A CPU's matrix-product throughput depends on it (one core here
    runs a decoder's MLP products on 150 rows at about two thirds of its rate on 1000), so a
    roofline may take a throughput per row count (:func:`roofline_ms`). A sum keeps the rows of
    its larger-FLOP part."""

    proj_flops: float = 0.0
    attn_flops: float = 0.0
    mlp_flops: float = 0.0
    other_flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0
    rows: float = 0.0

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
            self.exps + other.exps,
            self.rows if (self.flops >= other.flops and self.rows) or not other.rows else other.rows,
        )

    def scaled(self, k: float) -> "Cost":
        return Cost(self.proj_flops * k, self.attn_flops * k, self.mlp_flops * k, self.other_flops * k, self.bytes * k,
                    self.exps * k, self.rows)

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

# The vision towers' shapes and costs live in costmodel_vision (re-exported here).
from .costmodel_vision import VisionSpec, vision_cost  # noqa: E402


@dataclass(frozen=True)
class LMSpec:
    """Decoder sizes. ``qkv_bias``: q/k/v projections have biases (Qwen2); ``head_norms``: per-head
    q/k RMSNorms (Qwen3).

    Sparse-MoE decoders (Qwen3-VL-30B-A3B): ``sparse_layers`` of the layers have ``experts``
    SwiGLU experts of width ``expert_intermediate`` and a router, of which ``experts_per_token``
    run for each token; the others have the dense ``intermediate`` MLP. FLOPs count the active
    experts only; parameters count all of them; weight bytes read count the experts a step's
    tokens reach (expected number under uniform routing).

    Hybrid decoders (Qwen3.5): ``linear`` lists the Gated DeltaNet linear-attention layers
    (``lin_*``: their key/value heads and head dims, ``conv_kernel`` their causal conv), whose
    MLPs are those of the other layers; ``gated_attention``: the attention layers' ``q_proj``
    also makes a per-head output gate.
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
    linear: tuple[int, ...] = ()
    gated_attention: bool = False
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 0

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
            return self.decoder_params() / self.layers
        expert = 3 * H * self.expert_intermediate
        mlp = self._mlp_mean(3 * H * self.intermediate, self.experts_reached(tokens) * expert + H * self.experts)
        return self._mixer_mean() + mlp + 2 * H

    @property
    def attention_layers(self) -> int:
        return self.layers - len(self.linear)

    @property
    def conv_dim(self) -> int:
        """Channels of a linear-attention layer's conv (its q, k and v)."""
        return 2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim

    def _linear_mixer_params(self) -> int:
        """A Gated DeltaNet token mixer: qkv, z, b, a projections, conv, decay parameters, gated
        norm, output projection."""
        H, vd, vh = self.hidden, self.lin_v_heads * self.lin_v_dim, self.lin_v_heads
        return H * self.conv_dim + H * vd + 2 * H * vh + self.conv_dim * self.conv_kernel + 2 * vh + self.lin_v_dim + vd * H

    def _mixer_mean(self) -> float:
        """Token-mixer parameters of one layer, mean over the layers."""
        lin = len(self.linear)
        return ((self.layers - lin) * self._attn_params() + lin * self._linear_mixer_params()) / self.layers

    def linear_mixer_flops_per_token(self) -> tuple[float, float]:
        """(projection + conv, recurrence) FLOPs of one token through one linear-attention layer;
        the recurrence (decay, delta update and read of a d_k x d_v state per value head) is
        counted as 6 d_k d_v per head, the chunked scan's order of work."""
        H, vd, vh = self.hidden, self.lin_v_heads * self.lin_v_dim, self.lin_v_heads
        proj = 2.0 * (H * self.conv_dim + H * vd + 2 * H * vh + vd * H) + 2.0 * self.conv_dim * self.conv_kernel
        return proj, 6.0 * vh * self.lin_k_dim * self.lin_v_dim

    def linear_state_bytes(self, dtype_bytes: int) -> int:
        """One sample's states in one linear-attention layer: the conv state in the model's dtype,
        the recurrent state in float32 (as HF keeps it)."""
        return self.conv_dim * self.conv_kernel * dtype_bytes + self.lin_v_heads * self.lin_k_dim * self.lin_v_dim * 4

    def linear_layer_params(self) -> float:
        """A linear-attention layer: its mixer, the (mean) MLP and two RMSNorms."""
        return self._linear_mixer_params() + self.layer_params() - self._attn_params()

    def decoder_params(self) -> float:
        """All decoder layers."""
        return self.attention_layers * self.layer_params() + len(self.linear) * self.linear_layer_params()

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def _attn_params(self) -> int:
        H, q, kv = self.hidden, self.q_width, self.kv_width
        norms = 2 * self.head_dim if self.head_norms else 0  # per-head q/k RMSNorm weights
        gate = H * q if self.gated_attention else 0  # the gate's half of q_proj
        return H * q + 2 * H * kv + q * H + ((q + 2 * kv) if self.qkv_bias else 0) + norms + gate

    def layer_params(self) -> float:
        """Parameters of one attention layer (mean over the layers' MLPs; every expert counted)."""
        H = self.hidden
        mlp = self._mlp_mean(3 * H * self.intermediate, self.experts * (3 * H * self.expert_intermediate + H))
        return self._attn_params() + mlp + 2 * H  # + two RMSNorm weights

    def params(self) -> int:
        """Decoder layers, final norm, embedding and LM head."""
        emb = self.vocab * self.hidden
        return round(self.decoder_params()) + self.hidden + emb + (0 if self.tied_embeddings else emb)

    def linear_flops_per_token(self) -> tuple[float, float]:
        """(projection, MLP) FLOPs of one token through one attention layer (MLP: the active experts
        and the router of a sparse layer; mean over the layers)."""
        H, q, kv = self.hidden, self.q_width, self.kv_width
        mlp = self._mlp_mean(3 * H * self.intermediate,
                             self.experts_per_token * 3 * H * self.expert_intermediate + H * self.experts)
        gate = 2.0 * H * q if self.gated_attention else 0.0
        return 2.0 * (H * q + 2 * H * kv + q * H) + gate, 2.0 * mlp

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_width * dtype_bytes


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
    """A model for the cost model. ``alvts_rank``: the full-width selector's default rank;
    ``alvts_group_rank``: the per-group selector's (0: derived from ``alvts_rank`` as the method
    derives it); ``alvts_form``: the selector form a setting without ``selector_form`` runs;
    ``score_passes``: how often the fused ALVTS score forms each logit (2: the CUDA kernel, the
    default; 1: the CPU kernel)."""

    family: str
    lm: LMSpec
    vision: VisionSpec
    vip: VIPSpec
    alvts_rank: int
    dtype_bytes: int = 2
    alvts_group_rank: int = 0
    alvts_form: str = "group_rope"
    score_passes: int = 2

    def selector_rank(self, form: str) -> int:
        """Default rank of ALVTS selector form ``form`` on this model."""
        if form == "full_width":
            return self.alvts_rank
        if self.alvts_group_rank:
            return self.alvts_group_rank
        from .methods.alvts_selector import group_rope_rank

        return group_rope_rank(self.alvts_rank, self.lm.hidden, self.lm.kv_heads, self.lm.head_dim)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "lm": asdict(self.lm),
            "vision": asdict(self.vision),
            "vip": asdict(self.vip),
            "alvts_rank": self.alvts_rank,
            "alvts_group_rank": self.selector_rank("group_rope"),
            "alvts_form": self.alvts_form,
            "score_passes": self.score_passes,
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


def arch_from_config(config, dtype_bytes: int = 2, alvts_rank: int | None = None, score_passes: int = 2) -> Arch:
    """An :class:`Arch` from the Hugging Face config of any supported family (its adapter
    describes the vision tower and the decoder's biases); ``score_passes``: 2 for a model on a
    GPU, 1 on the CPU (see :class:`Arch`)."""
    from .models import adapter_class

    family = adapter_class(config.model_type)
    from . import hf

    tc = config.text_config
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    linear = tuple(i for i, t in enumerate(hf.layer_types(tc)) if t == hf.LINEAR)
    hybrid = dict(linear=linear, gated_attention=True, lin_k_heads=tc.linear_num_key_heads,
                  lin_v_heads=tc.linear_num_value_heads, lin_k_dim=tc.linear_key_head_dim,
                  lin_v_dim=tc.linear_value_head_dim, conv_kernel=tc.linear_conv_kernel_dim) if linear else {}
    lm = LMSpec(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        heads=heads,
        kv_heads=tc.num_key_value_heads or heads,
        head_dim=head_dim,
        # Qwen3.5-MoE has no dense MLP width: its shared expert stands in (not counted as an expert)
        intermediate=getattr(tc, "intermediate_size", None) or tc.shared_expert_intermediate_size,
        vocab=tc.vocab_size,
        qkv_bias=family.qkv_bias(config),
        tied_embeddings=bool(
            getattr(tc, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
        ),
        head_norms=family.head_norms(config),
        **_moe_sizes(tc),
        **hybrid,
    )
    vision = family.cost_vision_spec(config)
    vip = VIPSpec(llm_heads=heads, vision_width=vision.width)
    if alvts_rank is None:
        alvts_rank = family.alvts_rank_for(lm.hidden)
    from .methods.alvts_selector import group_rope_rank

    return Arch(family=config.model_type, lm=lm, vision=vision, vip=vip, alvts_rank=alvts_rank,
                dtype_bytes=dtype_bytes, score_passes=score_passes,
                alvts_group_rank=group_rope_rank(alvts_rank, lm.hidden, lm.kv_heads, lm.head_dim),
                # per-head q/k norms make q.k nonlinear in the input: such decoders run the full-width form
                alvts_form="full_width" if lm.head_norms else "group_rope")


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
        proj_flops=batch * n * proj, attn_flops=batch * attn, mlp_flops=batch * n * mlp, bytes=w + batch * (act + kv),
        rows=batch * n,
    )


def linear_layer_cost(lm: LMSpec, n: int, batch: int = 1, dtype_bytes: int = 2, weights: bool = True,
                      mlp_rows: int | None = None) -> Cost:
    """One linear-attention layer scanning ``n`` tokens per sample (its MLP on ``mlp_rows``, default
    ``n``); it writes its fixed-size states instead of a KV cache."""
    proj, scan = lm.linear_mixer_flops_per_token()
    _, mlp = lm.linear_flops_per_token()
    rows = n if mlp_rows is None else mlp_rows
    H, I = lm.hidden, lm.intermediate
    act = 2.0 * n * dtype_bytes * (4 * H + 2 * lm.conv_dim) + 2.0 * rows * dtype_bytes * 3 * I
    w = lm.linear_layer_params() * dtype_bytes if weights else 0
    return Cost(proj_flops=batch * n * proj, attn_flops=batch * n * scan, mlp_flops=batch * rows * mlp,
                bytes=w + batch * (act + lm.linear_state_bytes(dtype_bytes)), rows=batch * rows)


def stack_cost(lm: LMSpec, layers: range, n: int, pairs: float, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    """Decoder ``layers`` on ``n`` tokens per sample (``pairs`` causal pairs in each attention layer)."""
    lin = sum(1 for i in layers if i in lm.linear)
    out = lm_layer_cost(lm, n, pairs, batch, dtype_bytes).scaled(len(layers) - lin) if len(layers) > lin else Cost()
    return out + linear_layer_cost(lm, n, batch, dtype_bytes).scaled(lin) if lin else out


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


def selector_layer_cost(arch: Arch, n: int, batch: int = 1, form: str | None = None, rank: int | None = None) -> Cost:
    """ALVTS selector of one layer on ``n`` tokens per sample, as the method runs it (default: the
    arch's form and that form's rank); the count lives beside the selector,
    :func:`token_prune.methods.alvts_selector.layer_cost`."""
    from .methods.alvts_selector import layer_cost

    form = form or arch.alvts_form
    return layer_cost(arch.lm, n, form, rank or arch.selector_rank(form), arch.dtype_bytes, batch, arch.score_passes)


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
    selector_form: str | None = None,
    alvts_rank: int | None = None,
) -> dict[str, Cost]:
    """Stages of the language-model prefill (decoder layers and the method's own work; no LM head).

    Args:
        text, visual: tokens per sample; ``kept``: visual tokens kept (default ``ceil(f N)``).
        method: ``none``, ``glimpse``, ``fastv``, ``random`` or ``alvts``.
        skipped: ALVTS only, ``"context"`` or ``"drop"`` (see :mod:`token_prune.methods.alvts`).
        selector_form, alvts_rank: ALVTS only, the selector (default: ``arch``'s form and that
            form's default rank; :func:`selector_layer_cost`).
    """
    lm, b = arch.lm, arch.dtype_bytes
    L = lm.layers
    n = text + visual
    k = kept if kept is not None else kept_count(visual, keep_ratio)
    m = text + k
    kvb = lm.kv_bytes_per_token(b)
    if method == "none":
        return {"layers": stack_cost(lm, range(L), n, _causal_pairs(n), batch, b)}
    if method in ("glimpse", "fastv", "random"):
        if K is None:
            raise ValueError(f"{method}: K is needed")
        g = 1 if method == "glimpse" else 0
        full = n + g
        stages = {"layers_0_K": stack_cost(lm, range(K + 1), full, _causal_pairs(full), batch, b)}
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
        cache_layers = sum(1 for i in range(K + 1) if i not in lm.linear) if method == "glimpse" else 0
        stages["compact"] = Cost(bytes=batch * ((full + m) * lm.hidden * b + cache_layers * (full + m) * kvb))
        stages["layers_K1_L"] = stack_cost(lm, range(K + 1, L), m, _causal_pairs(m), batch, b)
        return stages
    if method == "alvts":
        s = start_layer
        stages = {}
        if s:
            stages["layers_before_start"] = stack_cost(lm, range(s), n, _causal_pairs(n), batch, b)
        stages["select"] = selector_layer_cost(arch, n, batch, selector_form, alvts_rank).scaled(L - s)
        if skipped == "context":
            pairs = k * (visual + 1) / 2.0 + text * visual + _causal_pairs(text)
            layer = lm_layer_cost(lm, m, pairs, batch, b)
            skip = n - m  # K/V projections of the skipped rows: read their state, write their cache entries
            layer = layer + Cost(proj_flops=batch * skip * 2.0 * lm.hidden * 2 * lm.kv_width,
                                 bytes=batch * skip * (2 * lm.hidden * b + kvb))
            # A linear-attention layer scans every token, its MLP runs on the selected rows only.
            lin = sum(1 for i in range(s, L) if i in lm.linear)
            stages["layers"] = layer.scaled(L - s - lin) + linear_layer_cost(lm, n, batch, b, mlp_rows=m).scaled(lin)
        elif skipped == "drop":
            stages["layers"] = stack_cost(lm, range(s, L), m, _causal_pairs(m), batch, b)
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
    """Per-layer KV cache length of one sample right after prefill (0 for a linear-attention layer)."""
    kv = _kv_lens(arch, text, visual, method, keep_ratio=keep_ratio, K=K, start_layer=start_layer, kept=kept,
                  skipped=skipped)
    return [0 if i in arch.lm.linear else c for i, c in enumerate(kv)]


def _kv_lens(arch, text, visual, method, *, keep_ratio, K, start_layer, kept, skipped) -> list[int]:
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
    A, lin = lm.attention_layers, len(lm.linear)
    ctx = sum(c + generated for i, c in enumerate(kv) if i not in lm.linear)
    lin_proj, lin_scan = lm.linear_mixer_flops_per_token()
    layers = Cost(
        proj_flops=batch * (A * proj + lin * lin_proj) + 2.0 * batch * lm.hidden * lm.vocab,
        mlp_flops=batch * lm.layers * mlp,
        bytes=(lm.layers * lm.read_layer_params(batch) + lm.hidden + lm.hidden * lm.vocab) * b,
    )
    # Linear-attention layers read and write their fixed-size states instead of a growing cache.
    cache = Cost(
        attn_flops=4.0 * lm.heads * lm.head_dim * batch * (ctx + A) + batch * lin * lin_scan,
        bytes=batch * (ctx * kvb + A * kvb + 2 * lin * lm.linear_state_bytes(b)),
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
    selector_form: str | None = None,
    alvts_rank: int | None = None,
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
        skipped=skipped, selector_form=selector_form, alvts_rank=alvts_rank,
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
        "selector_form": (selector_form or arch.alvts_form) if method == "alvts" else None,
        "alvts_rank": (alvts_rank or arch.selector_rank(selector_form or arch.alvts_form)) if method == "alvts" else None,
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
            "lm_prefill_exps": total(pre).exps,
            "ttft_flops": total(vis).flops + total(pre).flops + head.flops,
            "decode_step_flops": total(dec).flops,
            "decode_step_bytes": total(dec).bytes,
        },
        "kv_len": kv,
        "kv_cache_bytes": batch * sum(kv) * arch.lm.kv_bytes_per_token(arch.dtype_bytes),
        "recurrent_state_bytes": batch * len(arch.lm.linear) * arch.lm.linear_state_bytes(arch.dtype_bytes),
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
    """Sum over stages of ``max(flops / peak, bytes / bandwidth)``, in ms: a lower bound.

    ``peak``: ``{"name", "flops", "bandwidth"}``, optionally ``"flops_by_rows"``: FLOP/s measured
    at a row count (``{str(rows): flops}``, as the CPU benchmark measures it), used for a stage
    whose :attr:`Cost.rows` it lists."""
    by_rows = peak.get("flops_by_rows") or {}

    def rate(c: Cost) -> float:
        return by_rows.get(str(int(c.rows)), peak["flops"]) if c.rows else peak["flops"]

    return sum(max(c.flops / rate(c), c.bytes / peak["bandwidth"]) for c in costs) * 1e3
