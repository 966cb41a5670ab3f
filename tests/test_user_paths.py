"""Paths users take that once gave wrong results without an error: a second generate on a pruned
cache, a static cache, gradients, deep copies, labels, embeddings instead of ids, beam search,
several return sequences, generate without a cache, and options that made no sense.

Each is checked against the unpatched model, the masked oracle (tests/reference_model.py) or the
patched model's own verified paths; or it must raise an error that says what to do.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import token_prune as tp
from families import FAMILIES
from reference_model import masked_forward, masked_generate, masked_layers
from token_prune import hf
from token_prune.methods.base import PruneAfterLayer
from token_prune.tiny import SampleSpec, make_inputs, select_sample

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

METHODS = {
    "glimpse": dict(layer=2, keep_ratio=0.25),
    "fastv": dict(layer=2, keep_ratio=0.25),
    "alvts-drop": dict(keep_ratio=0.25, skipped="drop"),
}


def _method(mid):
    return mid.split("-")[0], dict(METHODS[mid])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request):
    row = FAMILIES[request.param]
    return row, row.build(torch.float64, seed=13)


def _rules(handle, mask, num_layers):
    valid = mask.bool()
    m = handle.method
    if isinstance(m, PruneAfterLayer):
        keep = handle.keep_mask & valid
        prefill = [valid if li <= m.layer else keep for li in range(num_layers)]
        return prefill, ([keep] * num_layers if m.prunes_cache else prefill), None
    processed = [p & valid for p in m.last_processed]
    keys = processed if m.skipped == "drop" else [valid] * num_layers
    return keys, keys, [valid & ~p for p in processed]


def _new(out, inputs):
    return out[:, inputs["input_ids"].shape[1]:]


# -- a second generate continuing from the returned (pruned) cache --------------------------------

@pytest.mark.parametrize("mid", sorted(METHODS))
def test_second_generate_continues_from_the_pruned_cache(fam, mid):
    """Turn 2 = the turn-1 answer and new user text appended, generate restarted on turn 1's
    cache: equal to the masked oracle that decodes turn 1, feeds the new text and goes on."""
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, [SampleSpec(images=(row.image,))], seed=1)
    L = model.config.text_config.num_hidden_layers
    more = torch.tensor([[17, 23, 29]])
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        rules = _rules(handle, inputs["attention_mask"], L)
        seq = torch.cat([first.sequences, more], 1)
        # The images are in the cache already: turn 2 passes no pixels (as with an unpatched model),
        # but the image sizes that number M-RoPE positions.
        turn2 = dict(input_ids=seq, attention_mask=torch.ones_like(seq))
        turn2.update({k: v for k, v in inputs.items() if k in ("image_grid_thw", "image_sizes")})
        if "mm_token_type_ids" in inputs:
            turn2["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                    torch.zeros(1, seq.shape[1] - inputs["input_ids"].shape[1],
                                                                dtype=torch.long)], 1)
        second = model.generate(**turn2, max_new_tokens=4, do_sample=False, **{
            hf.cache_arg(model.generate): hf.output_cache(first)})
    forced = torch.cat([first.sequences[:, inputs["input_ids"].shape[1] + 1:], more], 1)
    ref, _ = masked_generate(model, inputs, 5, *rules[:2], skip_rows=rules[2], forced=forced,
                             decode_position=row.decode_position, prefill_position=row.prefill_position)
    assert _new(second, turn2).tolist() == ref[:, 1 + forced.shape[1]:].tolist()


# -- caches, gradients, copies, labels -----------------------------------------------------------

def test_static_cache_raises_instead_of_running_unpruned(fam):
    row, model = fam
    inputs = make_inputs(model, [SampleSpec(images=(row.image,))], seed=2)
    with tp.patch(model, method="fastv", layer=1, keep_ratio=0.5):
        with pytest.raises(NotImplementedError, match="static"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2)  # the default cache still prunes


@pytest.mark.parametrize("mid", ["glimpse", "fastv"])
def test_gradients_reach_the_layers_before_k(fam, mid):
    """d(loss)/d(weights of layer 0) through the pruned forward equals the masked oracle's: the
    compaction after K passes gradients back (float64)."""
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, row.samples(), seed=3)
    L = model.config.text_config.num_hidden_layers
    weight = model.model.language_model.layers[0].self_attn.o_proj.weight  # (an MoE layer has no one MLP)
    with tp.patch(model, method=method, **opts) as handle:
        out = model(**inputs, use_cache=False, **row.prompt_positions(model, inputs))
        (got,) = torch.autograd.grad(out.logits[:, -1].square().sum(), weight)
        prefill, _, skip = _rules(handle, inputs["attention_mask"], L)
    ref = masked_forward(model, inputs, prefill, skip_rows=skip, prefill_position=row.prefill_position)
    (want,) = torch.autograd.grad(ref.logits[:, -1].square().sum(), weight)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_deep_copy_of_a_patched_model_is_unpatched_and_leaves_the_original_alone(fam):
    row, model = fam
    inputs = make_inputs(model, row.samples(), seed=4)
    with torch.no_grad():
        plain = model(**inputs).logits
        with tp.patch(model, method="glimpse", layer=2, keep_ratio=0.25) as handle:
            pruned = model(**inputs).logits
            stats = [dict(s) for s in handle.stats]
            twin = copy.deepcopy(model)
            assert tp.get_handle(twin) is None
            assert torch.equal(twin(**inputs).logits, plain)  # the copy prunes nothing
            assert handle.stats == stats  # ... and feeds nothing to the original's runtime
            assert torch.equal(model(**inputs).logits, pruned)
            with tp.patch(twin, method="glimpse", layer=2, keep_ratio=0.25):
                assert torch.equal(twin(**inputs).logits, pruned)  # the copy can be patched itself
        assert torch.equal(model(**inputs).logits, plain)


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_labels_give_the_loss_of_the_masked_oracle(fam, mid):
    """``model(**x, labels=...)`` on a patched model: the loss over the answer equals the oracle's
    loss; labels that score a pruned token raise."""
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, row.samples(), seed=5)
    L = model.config.text_config.num_hidden_layers
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100  # score the last 3 tokens (text), as an answer
    with tp.patch(model, method=method, **opts) as handle:
        out = model(**inputs, labels=labels, use_cache=False, **row.prompt_positions(model, inputs))
        prefill, _, skip = _rules(handle, inputs["attention_mask"], L)
        assert out.logits.shape[:2] == inputs["input_ids"].shape
        if isinstance(handle.method, PruneAfterLayer):  # (ALVTS keeps every row in the output)
            with pytest.raises(ValueError, match="labels score the output of a pruned token"):
                model(**inputs, labels=inputs["input_ids"], use_cache=False)
    ref = masked_forward(model, inputs, prefill, skip_rows=skip, prefill_position=row.prefill_position,
                         labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)


# -- how the prompt arrives, and generate's modes ---------------------------------------------------

def test_embeddings_instead_of_ids_are_pruned_too(fam):
    """A prompt given as embeddings (placeholders found as HF finds them) is pruned, and equals the
    oracle run on the same embeddings (positions may differ from the ids path in HF itself)."""
    row, model = fam
    inputs = make_inputs(model, row.samples(), seed=6)
    L = model.config.text_config.num_hidden_layers
    by_embeds = {k: v for k, v in inputs.items() if k != "input_ids"}
    by_embeds["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad(), tp.patch(model, method="glimpse", layer=2, keep_ratio=0.25) as handle:
        model(**inputs)
        by_ids = handle.stats
        got = model(**by_embeds, use_cache=False, **row.prompt_positions(model, inputs)).logits
        assert [s["kept_tokens"] for s in handle.stats] == [s["kept_tokens"] for s in by_ids]
        prefill, _, _ = _rules(handle, inputs["attention_mask"], L)
    with torch.no_grad():
        want = masked_forward(model, by_embeds, prefill, prefill_position=row.prefill_position).logits
    kept = handle.keep_mask
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-9, atol=1e-9)
    assert got.shape[1] == int(kept.sum(1).max())


def _one_image_each(row):
    # transformers 5.17 repeats pixel_values row by row for beams / return sequences, which
    # misorders the images of a sample with several, or the tiles of an image made of several rows
    # (its own behaviour, patched or not).
    image = row.one_row_image or row.image
    return [SampleSpec(images=(image,), prefix_len=3, suffix_len=6),
            SampleSpec(images=(image,), prefix_len=5, suffix_len=4)]


@pytest.mark.parametrize("mid", sorted(METHODS))
def test_beam_search_equals_the_masked_oracle(fam, mid):
    """num_beams=2 (generate repeats each prompt per beam, after one vision pass or several): the
    same beams as HF's beam search on the unpatched model under the rules of generate's prefill."""
    row, model = fam
    method, opts = _method(mid)
    inputs = make_inputs(model, _one_image_each(row), seed=7)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method=method, **opts) as handle:
        got = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
        mask = inputs["attention_mask"].repeat_interleave(2, 0)
        rules = _rules(handle, mask, L)
        assert len(handle.stats) == 2 * inputs["input_ids"].shape[0]
    with torch.no_grad(), masked_layers(model, mask, *rules[:2], skip_rows=rules[2]):
        want = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(got, want)


def test_several_return_sequences_sample_like_the_oracle(fam):
    row, model = fam
    inputs = make_inputs(model, _one_image_each(row), seed=8)
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad(), tp.patch(model, method="glimpse", layer=2, keep_ratio=0.25) as handle:
        torch.manual_seed(0)
        got = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=3)
        mask = inputs["attention_mask"].repeat_interleave(3, 0)
        rules = _rules(handle, mask, L)
        assert len(handle.stats) == 3 * inputs["input_ids"].shape[0]
    with torch.no_grad(), masked_layers(model, mask, *rules[:2]):
        torch.manual_seed(0)
        want = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert torch.equal(got, want)


def test_generate_without_a_cache_prunes_every_step_as_a_fresh_prefill(fam):
    """use_cache=False: each step is a new prefill over the grown sequence (the vision features of
    the first pass are reused); equal to calling the patched model step by step."""
    row, model = fam
    inputs = make_inputs(model, [SampleSpec(images=(row.image,))], seed=9)
    with torch.no_grad(), tp.patch(model, method="glimpse", layer=2, keep_ratio=0.25):
        got = _new(model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False), inputs)
        x, want = dict(inputs), []
        for _ in range(3):
            nxt = model(**x, use_cache=False, **row.prompt_positions(model, x)).logits[:, -1].argmax(-1, keepdim=True)
            want.append(nxt)
            x["input_ids"] = torch.cat([x["input_ids"], nxt], 1)
            x["attention_mask"] = torch.cat([x["attention_mask"], torch.ones_like(nxt)], 1)
            if "mm_token_type_ids" in x:
                x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    assert got.tolist() == torch.cat(want, 1).tolist()


# -- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fastv", "random"])
def test_pruning_after_the_last_layer_is_refused(fam, method):
    _, model = fam
    L = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match=f"layer={L - 1} is the last decoder layer"):
        tp.patch(model, method=method, layer=L - 1)
    assert tp.get_handle(model) is None
    tp.patch(model, method=method, layer=L - 2).remove()


def test_a_vip_of_another_family_is_refused(fam):
    from token_prune.vip import GlimpseModules

    row, model = fam
    with pytest.warns(UserWarning):
        vip = tp.patch(model, method="glimpse").method.modules
    tp.unpatch(model)
    other = GlimpseModules.random(dataclasses.replace(vip.config, model_type="some_other_family"))
    with pytest.raises(ValueError, match="trained for 'some_other_family' models"):
        tp.patch(model, method="glimpse", vip=other)
    assert tp.get_handle(model) is None


@pytest.mark.parametrize("scalar", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25)])
def test_numpy_and_tensor_scalars_are_accepted_as_options(fam, scalar):
    _, model = fam
    with tp.patch(model, method="fastv", keep_ratio=scalar, layer=np.int64(2)) as handle:
        assert handle.options == {"layer": 2, "keep_ratio": 0.25}
        assert type(handle.options["keep_ratio"]) is float


def test_patching_a_part_of_the_model_names_the_whole_model(fam):
    _, model = fam
    with pytest.raises(ValueError, match="patches the whole .*ForConditionalGeneration"):
        tp.patch(model.model, method="fastv")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_select_sample_is_consistent_with_the_batch(fam):
    """(The helper the contract tests use for batch == alone.)"""
    row, model = fam
    inputs = make_inputs(model, row.samples(), seed=10)
    one = select_sample(model, inputs, 1)
    alone = make_inputs(model, row.samples()[1:], seed=10)
    assert one["input_ids"].shape[1] == int(inputs["attention_mask"][1].sum())
    assert set(one) == set(alone)
