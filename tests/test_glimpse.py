"""What is particular to GlimpsePrune (on a tiny Qwen2.5-VL): its options, its VIP checkpoints
(ours and the public layout), the keep rule, sampling. The contract it shares with every method
(keep-all, masked oracle, caches, batching, removal) is tests/test_contract.py."""

from __future__ import annotations


import pytest
import torch

import token_prune as tp
from token_prune.runtime import keep_mask_from_scores
from token_prune.tiny import SampleSpec, make_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

K = 2


@pytest.fixture(scope="module")
def model32():
    return tiny_model("qwen2_5_vl", dtype=torch.float32, seed=2)


def two_samples():
    return [
        SampleSpec(images=((128, 128),), prefix_len=3, suffix_len=6),
        SampleSpec(images=((64, 96), (32, 32)), prefix_len=5, suffix_len=4),
    ]


def test_generation_runs_greedy_and_sampling(model32):
    inputs = make_inputs(model32, two_samples(), seed=6)
    S = inputs["input_ids"].shape[1]
    with torch.no_grad(), tp.patch(model32, method="glimpse", keep_ratio=0.1, layer=K) as handle:
        greedy = model32.generate(**inputs, max_new_tokens=8, do_sample=False)
        torch.manual_seed(0)
        sampled = model32.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=20)
        assert handle.stats[0]["kept_tokens"] < handle.stats[0]["visual_tokens"]
    assert greedy.shape == (2, S + 8) and sampled.shape == (2, S + 8)
    assert torch.equal(greedy[:, :S], inputs["input_ids"])


# -- the glimpse attention map ----------------------------------------------------------------

# -- patch / remove ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(method="nope"), ValueError, "unknown method 'nope'"),
        (dict(method=3), TypeError, "method must be a string"),
        (dict(threshold=1.5), ValueError, r"threshold must be in \[0, 1\]"),
        (dict(threshold=-0.1), ValueError, r"threshold must be in \[0, 1\]"),
        (dict(keep_ratio=0.0), ValueError, r"keep_ratio must be in \(0, 1\]"),
        (dict(keep_ratio=1.2), ValueError, r"keep_ratio must be in \(0, 1\]"),
        (dict(max_keep_ratio=0), ValueError, r"max_keep_ratio must be in \(0, 1\]"),
        (dict(layer=6), ValueError, r"layer must be in \[0, 5\]"),
        (dict(layer=-1), ValueError, r"layer must be in \[0, 5\]"),
        (dict(layer=1.5), TypeError, "layer must be an int"),
        (dict(min_keep=-1), ValueError, "min_keep"),
        (dict(vip=42), TypeError, "vip must be a path"),
        (dict(bogus=1), TypeError, "bogus"),
    ],
)
def test_bad_options_raise_and_leave_model_unpatched(model32, kwargs, exc, match):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "glimpse")
    with pytest.raises(exc, match=match):
        tp.patch(model32, method=method, **kwargs)
    assert tp.get_handle(model32) is None
    assert all("forward" not in m.__dict__ for m in model32.modules())


def test_unsupported_model_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not support model_type 'llama'.*qwen2_5_vl"):
        tp.patch(model)
    with pytest.raises(TypeError):
        tp.patch("not a model")


def test_vip_that_does_not_fit_is_rejected(model32):
    from token_prune.vip import GlimpseConfig, GlimpseModules

    cfg = GlimpseConfig(llm_hidden_size=48, llm_num_layers=6, llm_num_heads=4, vision_width=32,
                        vision_layers=[3, 2, 1, 0], layer=2)
    with pytest.raises(ValueError, match="hidden"):
        tp.patch(model32, method="glimpse", vip=GlimpseModules.random(cfg, seed=0))
    assert tp.get_handle(model32) is None


def test_vip_from_public_checkpoint_equals_our_format(model32, tmp_path):
    from token_prune.vip import GlimpseModules

    handle = tp.patch(model32, method="glimpse", layer=K, seed=11, threshold=0.5)
    mods = handle.method.modules
    handle.remove()
    ours = tmp_path / "ours"
    mods.save(ours)
    public = tmp_path / "public"
    public.mkdir()
    write_public_checkpoint(mods, model32, public)
    inputs = make_inputs(model32, two_samples(), seed=14)
    results = []
    for path in (ours, public):
        with torch.no_grad(), tp.patch(model32, method="glimpse", vip=str(path), threshold=0.5) as h:
            assert h.method.layer == K
            logits = model32(**inputs).logits
            results.append((h.keep_mask.clone(), logits))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert isinstance(GlimpseModules.load(ours), GlimpseModules)


def write_public_checkpoint(mods, model, path):
    """Write ``mods`` in the public GlimpsePrune layout (config.json + new_modules_gp.pt)."""
    import json

    cfg = mods.config
    text = model.config.text_config
    public_cfg = {
        "model_type": "qwen2_5_vl_gp",
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "vision_config": {"hidden_size": model.config.vision_config.hidden_size,
                          "depth": model.config.vision_config.depth},
        "selected_layers": [cfg.layer],
        "reduce_layer": cfg.layer,
        "selected_visual_layers": list(cfg.vision_layers),
        "attn_fuse_size": cfg.hidden_size,
        "visual_cond_size": cfg.cond_size,
        "attn_fuse_num_heads": cfg.num_heads,
        "use_attention_logits": cfg.glimpse_score == "logits",
        "le_layers": list(range(text.num_hidden_layers)),
        "le_length": 1,
        "attn_fuse_global": True,
        "deep_supervision": False,
    }
    (path / "config.json").write_text(json.dumps(public_cfg))
    sd = {k[len("vip."):]: v.clone() for k, v in mods.state_dict().items() if k.startswith("vip.")}
    torch.save(
        {
            "attn_fuser": sd,
            "learnable_embeddings": mods.glimpse.embeddings.detach().clone(),
            "le_proj": {"weight": mods.glimpse.proj.weight.detach().clone(),
                        "bias": mods.glimpse.proj.bias.detach().clone()},
            "le_norm": {"weight": mods.glimpse.norm.weight.detach().clone()},
        },
        path / "new_modules_gp.pt",
    )


# -- keep rule (hand-computed) ----------------------------------------------------------------

def test_keep_rule_hand_computed():
    logit = lambda p: torch.logit(torch.tensor(p, dtype=torch.float64))  # noqa: E731
    scores = logit([0.9, 0.2, 0.7, 0.6, 0.1,  0.3, 0.8, 0.55])
    sizes = [5, 3]
    got = keep_mask_from_scores(scores, sizes, threshold=0.5)
    assert got.tolist() == [True, False, True, True, False,  False, True, True]
    # Cap at floor(0.4 * 5) = 2 and floor(0.4 * 3) = 1, top-scored first.
    got = keep_mask_from_scores(scores, sizes, threshold=0.5, max_keep_ratio=0.4)
    assert got.tolist() == [True, False, True, False, False,  False, True, False]
    # Threshold so high nobody passes: min_keep top-scored per image.
    got = keep_mask_from_scores(scores, sizes, threshold=0.99, min_keep=2)
    assert got.tolist() == [True, False, True, False, False,  False, True, True]
    got = keep_mask_from_scores(scores, sizes, threshold=0.99, min_keep=0)
    assert not got.any()
    # keep_ratio: ceil(0.5 * 5) = 3, ceil(0.5 * 3) = 2, threshold ignored.
    got = keep_mask_from_scores(scores, sizes, threshold=0.0, keep_ratio=0.5)
    assert got.tolist() == [True, False, True, True, False,  False, True, True]
    # Ties go to the earlier token.
    got = keep_mask_from_scores(torch.zeros(4), [4], keep_ratio=0.5)
    assert got.tolist() == [True, True, False, False]


def test_threshold_rule_end_to_end(model32):
    """With the default threshold rule the kept set is exactly sigmoid(VIP logits) > threshold."""
    inputs = make_inputs(model32, two_samples(), seed=15)
    handle = tp.patch(model32, method="glimpse", layer=K, threshold=0.5, min_keep=0)
    seen = {}
    hook = handle.method.modules.vip.register_forward_hook(lambda m, a, o: seen.update(logits=o.clone()))
    with torch.no_grad():
        model32(**inputs)
    hook.remove()
    keep = handle.keep_mask
    handle.remove()
    visual = inputs["input_ids"] == model32.config.image_token_id
    assert torch.equal(keep[visual], torch.sigmoid(seen["logits"].float()) > 0.5)
