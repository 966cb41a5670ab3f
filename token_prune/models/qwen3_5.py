"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, MoE ``Qwen3_5MoeForConditionalGeneration``): a
hybrid decoder and a plain ViT.

Built on the Qwen3-VL adapter (prompt and pixel layout, videos with timestamp text, M-RoPE
bookkeeping, a ViT in natural order); Qwen3.5 has no deepstack. The decoder interleaves Gated DeltaNet linear-attention layers (a causal-conv state and a
recurrent state, no KV cache) with gated full-attention layers (every 4th layer in the published
models). Its attention layers differ from Qwen2.5-VL's in three ways the adapter hides: ``q_proj``
makes the queries and a per-head output gate (``[q_h, gate_h]`` per head), and M-RoPE rotates
only the first quarter of each head.

What pruning means for the linear-attention layers is in the runtime (see ``hf.py`` for the
cache layout): a layer after the pruning point scans only the kept tokens, so its state
summarises the kept sequence; a layer at or before it scanned the whole prompt.
"""

from __future__ import annotations

import torch

from .. import hf
from .base import head_norm
from .qwen2_vl import TINY_IDS
from .qwen3_vl import Qwen3VLAdapter

#: the published models put an attention layer after every three linear-attention layers
FULL_ATTENTION_INTERVAL = 4


class Qwen3_5Adapter(Qwen3VLAdapter):
    model_type = "qwen3_5"
    hf_model_class = "Qwen3_5ForConditionalGeneration"
    display_name = "Qwen3.5"
    tiny_image = (64, 64)
    # No public GlimpsePrune or ALVTS settings for Qwen3.5: K defaults to the attention layer at or
    # before 0.64 of the depth, the ALVTS rank to hidden/16.
    glimpse_layers: dict[int, int] = {}
    alvts_ranks: dict[int, int] = {}
    standard_qk = False  # gated q_proj, q/k norms, partial rotary: the fused glimpse kernel does not apply

    # -- the hybrid decoder ---------------------------------------------------------------
    @classmethod
    def attention_layers_for(cls, num_layers):
        return [i for i in range(num_layers) if (i + 1) % FULL_ATTENTION_INTERVAL == 0]

    def _queries(self, attn, h: torch.Tensor) -> torch.Tensor:
        """[B, T, heads, d] queries of an attention layer from its normed input (gate dropped)."""
        B, T, _ = h.shape
        return attn.q_proj(h).view(B, T, -1, 2 * self.head_dim)[..., :self.head_dim]

    def project_qk(self, layer_idx, hidden_in, cos, sin, want_k=True):
        layer = self.lm.layers[layer_idx]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden_in)
        B, T, _ = h.shape
        q = hf.apply_rotary(head_norm(attn, "q", self._queries(attn, h)).transpose(1, 2), cos, sin)
        if not want_k:
            return q, None
        k = hf.apply_rotary(head_norm(attn, "k", attn.k_proj(h).view(B, T, -1, self.head_dim)).transpose(1, 2), cos, sin)
        return q, k

    def query_projection(self, attn):
        d, H = self.head_dim, self.hidden_size
        w = attn.q_proj.weight.view(-1, 2 * d, H)[:, :d].reshape(-1, H)
        b = attn.q_proj.bias
        return w, None if b is None else b.view(-1, 2 * d)[:, :d].reshape(-1)

    def gate_attention_output(self, attn, normed, out):
        B, T, _ = normed.shape
        gate = attn.q_proj(normed).view(B, T, -1, 2 * self.head_dim)[..., self.head_dim:]
        return out * torch.sigmoid(gate.reshape(B, T, -1))

    # -- the family without a model ---------------------------------------------------------
    @classmethod
    def _config_classes(cls):
        from transformers import Qwen3_5Config

        return Qwen3_5Config, {}

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_depth: int = 4, vocab_size: int = 128,
                    layer_types: list[str] | None = None):
        """A tiny Qwen3.5: 6 decoder layers alternating linear and full attention (linear first, as
        in the published models, with linear layers before and after every attention layer), 4 ViT
        blocks, 8x8-pixel patches, head dim 32 of which M-RoPE rotates a quarter."""
        config_cls, extra = cls._config_classes()
        if layer_types is None:
            layer_types = [hf.LINEAR if i % 2 == 0 else hf.FULL for i in range(num_hidden_layers)]
        head_dim = 32
        half = int(head_dim * 0.25) // 2  # rotary frequencies, split between t, h and w
        text_config = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, max_position_embeddings=4096,
            rms_norm_eps=1e-6, initializer_range=0.2, layer_types=layer_types,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [half - 2 * (half // 4), half // 4, half // 4], "mrope_interleaved": True},
            **{k: TINY_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            **extra,
        )
        vision_config = cls.vision_config(hidden_size, vision_depth)
        rest = {k: v for k, v in TINY_IDS.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return config_cls(text_config=text_config, vision_config=vision_config, **rest)

    @classmethod
    def config_of_size(cls, **sizes):
        raise NotImplementedError("Qwen3.5: no config_of_size (the accuracy benchmark's small model is a Qwen2.5-VL)")

    @classmethod
    def vision_config(cls, hidden_size, vision_depth) -> dict:
        return dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                    patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                    num_position_embeddings=64, initializer_range=0.2)

    @classmethod
    def qkv_bias(cls, config):
        return bool(getattr(config.text_config, "attention_bias", False))


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """The mixture-of-experts variant: the same layers with a sparse MoE block as MLP."""

    model_type = "qwen3_5_moe"
    hf_model_class = "Qwen3_5MoeForConditionalGeneration"
    display_name = "Qwen3.5-MoE"
    tiny_model_options = {"experts_implementation": "eager"}  # HF's grouped kernels take no float64

    @classmethod
    def _config_classes(cls):
        from transformers import Qwen3_5MoeConfig

        return Qwen3_5MoeConfig, dict(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2)


__all__ = ["Qwen3_5Adapter", "Qwen3_5MoeAdapter", "FULL_ATTENTION_INTERVAL"]
