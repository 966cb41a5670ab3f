"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) and its MoE variant
(``Qwen3VLMoeForConditionalGeneration``): Qwen2-VL's layout with deepstack, per-head q/k norms
in the decoder, a plain ViT (LayerNorm, GELU MLP, learned position grid) of 16 px patches, and
videos whose temporal groups are separated by timestamp text in the prompt.

Deepstack: the ViT's blocks ``deepstack_visual_indexes`` (8, 16, 24 of 27) feed extra mergers
whose outputs the language model adds to the hidden state of every visual token after its first
decoder layers (one feature per layer). The package treats that feature as part of the token
(``TokenBatch.deepstack``): every visual token still present at such a layer receives it, a
pruned token's features leave with it (the compaction after layer K carries the remaining rows
along when K is inside the deepstack range), and under ALVTS a token that skips a layer still
receives that layer's feature, as it keeps its place in the residual stream.

VIP vision conditions: the outputs of four ViT blocks spread over the depth, deep to shallow
(``d*4/4-1, d*3/4-1, d*2/4-1, d/4-1``: blocks 26, 19, 12, 5 of the 27-block ViT of
Qwen3-VL-8B and -30B-A3B, 1152 wide), mean-pooled over each 2x2 merge group. No public
GlimpsePrune setting exists for Qwen3-VL; K defaults to 64% of the depth.

Videos: each temporal group (two frames) is one VIP segment on its own grid, the keep rules apply
per video, as for Qwen2-VL. The prompt of a video is ``<vision_start>`` then, per temporal group,
its timestamp text (``<0.5 seconds>``, :attr:`frame_prefix_tokens` tokens in the tiny prompts)
and ``<vision_start> <video>*n <vision_end>``, then ``<vision_end>``.
"""

from __future__ import annotations

from .qwen2_vl import TINY_IDS, Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    model_type = "qwen3_vl"
    hf_model_class = "Qwen3VLForConditionalGeneration"
    display_name = "Qwen3-VL"
    frame_prefix_tokens = 4

    def vision_width(self):
        return self.model.config.vision_config.hidden_size

    @classmethod
    def frame_prefix(cls, config, group):
        # Stands for the timestamp text: fixed plain-text ids, distinct per group.
        special = cls.special_ids(config)
        plain = [i for i in range(64) if i not in special][:10]
        return [plain[(group + j) % len(plain)] for j in range(cls.frame_prefix_tokens)]

    @classmethod
    def text_config(cls, num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, vocab_size) -> dict:
        head_dim = hidden_size // num_attention_heads
        half = head_dim // 2
        hw = half // 4
        return dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, head_dim=head_dim, max_position_embeddings=4096,
            rms_norm_eps=1e-6, initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw],
                             "mrope_interleaved": True},
            **{k: TINY_IDS[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})

    @classmethod
    def vision_config(cls, hidden_size, vision_depth) -> dict:
        # Deepstack from three of the four blocks: the decoder's layers 0, 1, 2 receive features.
        return dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                    patch_size=8, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                    num_position_embeddings=64, deepstack_visual_indexes=list(range(min(3, vision_depth))),
                    initializer_range=0.2)

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_depth: int = 4, vocab_size: int = 128):
        """A tiny Qwen3-VL: 6 decoder layers (layers 0-2 receive deepstack features), 4 ViT blocks
        32 wide (blocks 0-2 feed deepstack), 8x8-pixel patches, interleaved M-RoPE.

        The ViT's initializer_range is 0.2 like the decoder's, so the deepstack features are not
        negligible next to the hidden states (tests must see them)."""
        from transformers import Qwen3VLConfig

        rest = {k: v for k, v in TINY_IDS.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return Qwen3VLConfig(
            text_config=cls.text_config(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
                                        vocab_size),
            vision_config=cls.vision_config(hidden_size, vision_depth), **rest)

    @classmethod
    def cost_vision_spec(cls, config):
        from ..costmodel import VisionSpec

        vc = config.vision_config
        # Full attention in every block (a window as large as any image), a learned position grid,
        # and one more 2x2 merger per deepstack block (towers without deepstack, as Qwen3.5's, have
        # no deepstack_visual_indexes).
        return VisionSpec(kind="qwen_vit", depth=vc.depth, width=vc.hidden_size, heads=vc.num_heads,
                          intermediate=vc.intermediate_size, patch=vc.patch_size, in_channels=vc.in_channels,
                          out=vc.out_hidden_size, temporal_patch=vc.temporal_patch_size,
                          merge=vc.spatial_merge_size, window=1 << 20, fullatt=tuple(range(vc.depth)), mlp="gelu",
                          norm="layer", patch_bias=True, pos_embed=vc.num_position_embeddings,
                          deepstack_mergers=len(getattr(vc, "deepstack_visual_indexes", ())))

    @classmethod
    def qkv_bias(cls, config):
        return bool(getattr(config.text_config, "attention_bias", False))

    @classmethod
    def head_norms(cls, config):
        return True


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL with sparse-MoE decoder MLPs: only the routed experts run for a token."""

    model_type = "qwen3_vl_moe"
    hf_model_class = "Qwen3VLMoeForConditionalGeneration"
    display_name = "Qwen3-VL-MoE"
    # The experts' loop runs in float64 (the tests' dtype); the grouped kernels take no float64.
    tiny_model_options = {"experts_implementation": "eager"}

    @classmethod
    def tiny_config(cls, num_hidden_layers: int = 6, hidden_size: int = 64, num_attention_heads: int = 4,
                    num_key_value_heads: int = 2, vision_depth: int = 4, vocab_size: int = 128):
        """A tiny Qwen3-VL-MoE: the tiny Qwen3-VL with 4 experts per layer, 2 routed per token."""
        from transformers import Qwen3VLMoeConfig

        text = cls.text_config(num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, vocab_size)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, decoder_sparse_step=1)
        rest = {k: v for k, v in TINY_IDS.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
        return Qwen3VLMoeConfig(text_config=text, vision_config=cls.vision_config(hidden_size, vision_depth), **rest)
