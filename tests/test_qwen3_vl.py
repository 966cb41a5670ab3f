"""Qwen3-VL's deepstack under pruning, against the unpatched model with layer-wise masks.

The deepstack feature belongs to its token: every visual token still present after an early
decoder layer receives that layer's feature (the unpatched model adds it to every visual
position; the masked oracle hides the pruned ones), a pruned token's features leave with it, and
under ALVTS a skipped token still receives it. Each test also builds the oracle a wrong handling
would match (features dropped after layer K, or withheld from skipped tokens) and checks that the
patched model does *not* match it, so the test can fail.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from reference_model import deepstack_rows, masked_generate
from test_contract import oracle_rules

import token_prune as tp
from token_prune.models import adapter_for
from token_prune.models.qwen3_vl import Qwen3VLAdapter

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")
STEPS = 4


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def fam(request):
    row = FAMILIES[request.param]
    return row, row.build(torch.float64, seed=21)


def _deepstack_layers(model) -> int:
    return len(model.config.vision_config.deepstack_visual_indexes)


def _patched(model, inputs, method, **opts):
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        rules = oracle_rules(handle, inputs, model.config.text_config.num_hidden_layers)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.logits[0], rules


def _oracle(row, model, inputs, rules):
    prefill, decode, skip = rules
    with torch.no_grad():
        return masked_generate(model, inputs, STEPS, prefill, decode, skip_rows=skip,
                               decode_position=row.decode_position)


def test_tiny_model_has_deepstack_and_head_norms(fam):
    _, model = fam
    assert _deepstack_layers(model) == 3
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_norm")


@pytest.mark.parametrize("method", ["fastv", "glimpse", "random"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("videos", [False, True])
def test_prune_inside_the_deepstack_range_equals_the_oracle(fam, method, layer, videos):
    """K before the last deepstack layer: the kept tokens still receive the features of layers
    K+1.. (carried through the compaction); the pruned model equals the masked oracle, and not
    the oracle without deepstack features after layer K."""
    row, model = fam
    assert layer < _deepstack_layers(model) - 1
    inputs = (row.with_videos() if videos else row).inputs(model, seed=3)
    tokens, first, rules = _patched(model, inputs, method, keep_ratio=0.25, layer=layer)
    ref_tokens, ref_first = _oracle(row, model, inputs, rules)
    torch.testing.assert_close(first, ref_first.to(first.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, ref_tokens)
    # The wrong handling (kept tokens lose their features after the compaction) differs.
    with deepstack_rows(model, lambda li, rows, visual: rows * 0 if li > layer else rows):
        _, dropped_first = _oracle(row, model, inputs, rules)
    assert (first - dropped_first.to(first.dtype)).abs().max() > 1e-4


@pytest.mark.parametrize("skipped", ["context", "drop"])
def test_alvts_skipped_tokens_still_receive_deepstack(fam, skipped):
    """A visual token that skips a deepstack layer under ALVTS still gets that layer's feature:
    equal to the oracle (whose skip hook leaves the model's own deepstack addition in place), not
    to the oracle that withholds the feature from skipped tokens."""
    row, model = fam
    inputs = row.inputs(model, seed=4)
    tokens, first, rules = _patched(model, inputs, "alvts", keep_ratio=0.25, skipped=skipped)
    ref_tokens, ref_first = _oracle(row, model, inputs, rules)
    torch.testing.assert_close(first, ref_first.to(first.dtype), rtol=1e-6, atol=1e-6)
    assert torch.equal(tokens, ref_tokens)
    skip = rules[2]
    visual = adapter_for(model).visual_mask(input_ids=inputs["input_ids"])

    def withhold(li, rows, vis):
        rows[skip[li][visual]] = 0
        return rows

    with deepstack_rows(model, withhold):
        _, withheld_first = _oracle(row, model, inputs, rules)
    assert (first - withheld_first.to(first.dtype)).abs().max() > 1e-4


def test_vip_conditions_spread_over_the_vit():
    """The VIP reads four ViT blocks spread over the depth: 26, 19, 12, 5 of Qwen3-VL-8B's 27."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(depth=27, hidden_size=1152)))
    adapter = Qwen3VLAdapter(model)
    assert adapter.default_vision_layers() == [26, 19, 12, 5]
    assert adapter.vision_width() == 1152
