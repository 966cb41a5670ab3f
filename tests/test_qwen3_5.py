"""Qwen3.5 (dense and MoE): pruning in a hybrid decoder of Gated DeltaNet linear-attention layers
and full-attention layers, against the unpatched model with the pruned tokens removed from the
linear layers' scans (tests/reference_model.py) and against hand-computed cache sizes."""

from __future__ import annotations

import pytest
import torch

import token_prune as tp
from families import FAMILIES, pruning_layer
from reference_model import masked_generate, masked_layers
from test_contract import oracle_rules
from token_prune import hf
from token_prune.tiny import SampleSpec, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

HYBRID = ["qwen3_5", "qwen3_5_moe"]
#: (method, options) of a pruned run; K is made an attention layer where the method needs one
RUNS = {
    "glimpse": ("glimpse", dict(layer=3, keep_ratio=0.3)),
    "fastv": ("fastv", dict(layer=1, keep_ratio=0.3)),
    "random": ("random", dict(layer=2, keep_ratio=0.3, seed=3)),
    "alvts": ("alvts", dict(keep_ratio=0.3)),
    "alvts-drop": ("alvts", dict(keep_ratio=0.3, skipped="drop")),
}
DECODE_STEPS = 10


@pytest.fixture(scope="module", params=HYBRID)
def fam(request):
    row = FAMILIES[request.param]
    return row, row.build(torch.float64, seed=21)


def _linear_layers(model):
    return [i for i, layer in enumerate(model.model.language_model.layers) if hf.layer_kind(layer) == hf.LINEAR]


def test_tiny_models_have_both_layer_kinds(fam):
    _, model = fam
    L = model.config.text_config.num_hidden_layers
    linear = _linear_layers(model)
    attention = hf.attention_layers(model.config.text_config)
    assert linear and attention and sorted(linear + attention) == list(range(L))
    assert linear[0] == 0  # as in the published models: the cache's first layer holds no tokens


@pytest.mark.parametrize("run", sorted(RUNS))
def test_decode_after_pruning_equals_the_reference(fam, run):
    """Ten greedy tokens after a pruned prefill equal the unpatched model's with the pruned tokens
    removed from layer K+1 on (attention layers: masked keys; linear layers: removed from the
    scan), positions preserved; so do the first token's logits."""
    row, model = fam
    method, opts = RUNS[run]
    inputs = row.inputs(model, seed=31)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        out = model.generate(**inputs, max_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        rules = oracle_rules(handle, inputs, L)
        kept = [s["kept_tokens"] for s in handle.stats]
        visual = [s["visual_tokens"] for s in handle.stats]
    if method != "alvts":
        assert all(k < v for k, v in zip(kept, visual))  # something was pruned
    ref_tokens, ref_first = masked_generate(model, inputs, DECODE_STEPS, *rules,
                                            decode_position=row.decode_position)
    torch.testing.assert_close(out.logits[0], ref_first.to(out.logits[0].dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref_tokens)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_linear_states_equal_the_reference_states(fam, run):
    """After the prefill, every linear-attention layer's conv and recurrent states equal those of
    the reference (a layer after K scanned only the kept tokens; one at or before K the whole
    prompt, never GlimpsePrune's glimpse token)."""
    row, model = fam
    method, opts = RUNS[run]
    inputs = row.inputs(model, seed=32)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        cache = hf.output_cache(model(**inputs, use_cache=True))
        prefill, decode, skip = oracle_rules(handle, inputs, L)
    with torch.no_grad(), masked_layers(model, inputs["attention_mask"], prefill, decode, skip):
        ref = hf.output_cache(model(**inputs, use_cache=True))
    for li in _linear_layers(model):
        got, want = hf.linear_states(cache, li), hf.linear_states(ref, li)
        assert len(got) == len(want) == 2, li
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"layer {li}")


def test_pruning_changes_the_linear_states_after_k(fam):
    """The reference is not vacuous: a linear layer after K holds a different state than the
    unpatched model's (which scanned every token), one before K the same."""
    row, model = fam
    inputs = row.inputs(model, seed=33)
    with torch.no_grad():
        full = hf.output_cache(model(**inputs, use_cache=True))
        with tp.patch(model, method="fastv", layer=1, keep_ratio=0.3):
            pruned = hf.output_cache(model(**inputs, use_cache=True))
    for li in _linear_layers(model):
        same = all(torch.equal(a, b) for a, b in zip(hf.linear_states(full, li), hf.linear_states(pruned, li)))
        assert same == (li <= 1), li


@pytest.mark.parametrize("method", ["glimpse", "fastv"])
def test_linear_attention_k_is_refused_with_the_valid_choices(fam, method):
    _, model = fam
    attention = hf.attention_layers(model.config.text_config)
    linear = _linear_layers(model)
    with pytest.raises(ValueError, match=rf"layer={linear[1]} is a linear-attention layer.*{attention}".replace("[", r"\[")):
        tp.patch(model, method=method, layer=linear[1], keep_ratio=0.5)
    assert tp.get_handle(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_default_layers_are_attention_layers(fam):
    _, model = fam
    attention = hf.attention_layers(model.config.text_config)
    with tp.patch(model, method="fastv") as h:  # FastV's usual K=2 is linear here: the next attention layer
        assert h.method.layer == min(i for i in attention if i >= 2)
    with tp.patch(model, method="glimpse") as h:  # 0.64 of 6 layers = 4 -> the attention layer at or before
        assert h.method.layer == max(i for i in attention if i <= 4)
    assert pruning_layer(model, "fastv", 2) in attention


def test_memory_stats_by_hand(fam):
    """kv_bytes = kept tokens x attention layers x (keys + values) per token; the recurrent state
    bytes are the same with and without pruning: per linear layer conv_dim x kernel in the model's
    dtype plus v_heads x d_k x d_v in float32."""
    row, model = fam
    tc = model.config.text_config
    inputs = make_inputs(model, [SampleSpec(images=(row.image,), prefix_len=4, suffix_len=3)], seed=34)
    n_attn = len(hf.attention_layers(tc))
    n_lin = tc.num_hidden_layers - n_attn
    size = 8  # float64
    per_token = 2 * tc.num_key_value_heads * tc.head_dim * size
    conv_dim = 2 * tc.linear_num_key_heads * tc.linear_key_head_dim + tc.linear_num_value_heads * tc.linear_value_head_dim
    # The conv state is kept in the model's dtype, the recurrent state in float32 (HF's scan runs in it).
    state = (conv_dim * tc.linear_conv_kernel_dim * size
             + tc.linear_num_value_heads * tc.linear_key_head_dim * tc.linear_value_head_dim * 4)
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():
        for method, opts in [("glimpse", dict(layer=3, keep_ratio=0.25)), ("alvts", dict(keep_ratio=1.0))]:
            with tp.patch(model, method=method, **opts) as h:
                model(**inputs, use_cache=True)
                s = h.stats[0]
            kept = S - s["visual_tokens"] + s["kept_tokens"]
            assert s["kv_bytes"] == n_attn * kept * per_token
            assert s["recurrent_state_bytes"] == n_lin * state
            assert [k == 0 for k in s["kv_len"]] == [hf.layer_kind(x) == hf.LINEAR
                                                      for x in model.model.language_model.layers]
    assert kept == S  # the ALVTS row kept everything; the GlimpsePrune row's bytes were smaller above


def test_cost_model_of_the_9b_architecture():
    """The shipped qwen3_5_9b config: parameter counts of the meta-built model reproduced by the cost
    model; KV bytes only in the 8 attention layers, recurrent states in the 24 linear ones, by hand."""
    from token_prune import bench
    from token_prune import costmodel as cm

    arch = bench.load_arch("qwen3_5_9b")
    cfg = bench.hf_config(arch)
    model = bench.build_model(arch, device="meta", dtype=torch.bfloat16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    a = cm.arch_from_config(cfg)
    assert count(model) == arch["params"]
    assert a.lm.params() == count(model.model.language_model) + count(model.lm_head)
    assert a.vision.params() == count(model.model.visual)
    tc = cfg.text_config
    attention = hf.attention_layers(tc)
    assert len(attention) == 8 and len(a.lm.linear) == 24
    layout = dict(text=36, visual=3136, prompt=3172)
    kv_token = 2 * tc.num_key_value_heads * tc.head_dim * 2  # keys + values, bf16
    conv_dim = 2 * tc.linear_num_key_heads * tc.linear_key_head_dim + tc.linear_num_value_heads * tc.linear_value_head_dim
    state = conv_dim * tc.linear_conv_kernel_dim * 2 + tc.linear_num_value_heads * tc.linear_key_head_dim * tc.linear_value_head_dim * 4
    kept = 36 + cm.kept_count(3136, 0.11)
    for method, opts, kv in [("none", {}, [3172] * 8),
                             ("glimpse", dict(K=19, keep_ratio=0.11), [kept] * 8),
                             ("fastv", dict(K=3, keep_ratio=0.11), [3172] + [kept] * 7),
                             ("alvts", dict(keep_ratio=0.11, skipped="drop"), [kept] * 8)]:
        est = cm.estimate(a, layout, (1792, 1792), method, **opts)
        assert [est["kv_len"][i] for i in attention] == kv
        assert all(est["kv_len"][i] == 0 for i in a.lm.linear)
        assert est["kv_cache_bytes"] == sum(kv) * kv_token
        assert est["recurrent_state_bytes"] == 24 * state
