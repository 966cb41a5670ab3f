"""GlimpsePrune+ (token_prune.train.rl): patching PEFT-wrapped and LoRA-merged models, the pruned scoring
forward against the unpatched model and the float64 masked oracle (values and LoRA gradients), the
benchmark's processor, rewards, and a short GRPO run with checkpoints and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import token_prune as tp
from token_prune import tiny

peft = pytest.importorskip("peft", reason="the rl extra (pip install token_prune[rl]) is not installed")
pytest.importorskip("trl", reason="the rl extra (pip install token_prune[rl]) is not installed")

from token_prune.train import rl  # noqa: E402
from families import FAMILIES as ROWS  # noqa: E402
from reference_model import masked_generate  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")
K = 2


def _lora(model, seed=0, r=4):
    """LoRA on the language model's linears with random A *and* B, so the adapters change the
    model (PEFT's default B = 0 would leave it as it was)."""
    torch.manual_seed(seed)
    cfg = rl.lora_config(rank=r)
    cfg.init_lora_weights = False
    return peft.get_peft_model(model, cfg)


def _completion(inputs, C=5, seed=0):
    """A random right-padded completion [B, C] and its mask (sample 1 ends early)."""
    B = inputs["input_ids"].shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 60, (B, C), generator=g)
    mask = torch.ones(B, C, dtype=torch.long)
    mask[1, C - 2:] = 0
    return ids, mask


def _full_inputs(inputs, ids, mask):
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], mask], 1)
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    return full


# -- patch on a PEFT-wrapped / LoRA-merged model ----------------------------------------------

FAMILIES = {  # name -> (build, make_inputs, samples, decode_position, prefill_position), from the family table
    name: (lambda row=ROWS[name]: row.build(torch.float64, seed=3), tiny.make_inputs, ROWS[name].samples,
           ROWS[name].decode_position, ROWS[name].prefill_position)
    for name in ("qwen2_5_vl", "llava")
}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "llava"])
def lora_model(request):
    """(family, float64 tiny model with random LoRA adapters)."""
    build, make_inputs, samples, _, prefill_position = FAMILIES[request.param]
    model = _lora(build(), seed=11).to(torch.float64)
    return model, (lambda seed: make_inputs(model, samples(), seed=seed)), prefill_position


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("merged", [False, True])
def test_keep_all_on_lora_model_equals_unpatched(family, merged):
    build, make_inputs, samples, _, _ = FAMILIES[family]
    model = _lora(build()).to(torch.float64)
    if merged:
        model = model.merge_and_unload()
    inputs = make_inputs(model, samples(), seed=1)
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with tp.patch(model, method="glimpse", keep_ratio=1.0, layer=K) as h:
            assert tp.get_handle(model) is h
            out = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert tp.get_handle(model) is None
        after = model(**inputs).logits
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-12, atol=1e-12)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(after, ref)
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not getattr(model, "base_model", None))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pruned_lora_model_matches_masked_oracle(family):
    """The contract test of the plain models, on a LoRA-wrapped one: pruned greedy generation ==
    the unpatched (LoRA) model with the pruned tokens hidden from every layer after K."""
    build, make_inputs, samples, decode_position, prefill_position = FAMILIES[family]
    model = _lora(build(), seed=2).to(torch.float64)
    inputs = make_inputs(model, samples(), seed=4)
    valid = inputs["attention_mask"].bool()
    L = hf_model_layers(model)
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.3, layer=K) as h:
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        keep = h.keep_mask.clone()
    assert bool((~keep & valid).any())  # something was pruned
    prefill = [valid if li <= K else keep for li in range(L)]
    ref, _ = masked_generate(model.get_base_model(), inputs, 5, prefill, [keep] * L, decode_position=decode_position,
                             prefill_position=prefill_position)
    assert torch.equal(tokens, ref)


def hf_model_layers(model) -> int:
    return tp.api.hf_model(model).config.text_config.num_hidden_layers


def test_patching_a_peft_model_twice_or_through_its_base_is_refused(lora_model):
    model = lora_model[0]
    with tp.patch(model, method="glimpse", layer=K):
        with pytest.raises(ValueError, match="already patched"):
            tp.patch(model.get_base_model(), method="fastv")
        with pytest.raises(ValueError, match="already patched"):
            tp.patch(model, method="glimpse")
    assert tp.unpatch(model) is False


# -- the scoring forward ----------------------------------------------------------------------

def _one_forward_logits(model, inputs, ids, mask, prefill_position):
    full = _full_inputs(inputs, ids, mask)
    if prefill_position is not None:  # 1D RoPE: number the tokens as generate does
        full["position_ids"] = prefill_position(model, full["attention_mask"])
    P = inputs["input_ids"].shape[1]
    return model(**full).logits[:, P - 1:P + ids.shape[1] - 1]


def test_completion_logits_unpatched_equal_one_forward(lora_model):
    """Prefill + one forward on the cache == one forward over prompt + completion (positions and
    masks as generate numbers them); with everything kept, the patched model gives the same."""
    model, make_inputs, prefill_position = lora_model
    inputs = make_inputs(5)
    ids, mask = _completion(inputs)
    m = mask.bool()
    with torch.no_grad():
        ref = _one_forward_logits(model, inputs, ids, mask, prefill_position)
        got = rl.completion_logits(model, inputs, ids, mask)
        with tp.patch(model, method="glimpse", keep_ratio=1.0, layer=K):
            kept_all = rl.completion_logits(model, inputs, ids, mask)
    torch.testing.assert_close(got[m], ref[m], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kept_all[m], ref[m], rtol=1e-12, atol=1e-12)


def test_completion_logits_are_the_rollout_distribution(lora_model):
    """On the pruned model the scoring forward gives exactly the logits generate sampled from."""
    model, make_inputs, _ = lora_model
    inputs = make_inputs(6)
    P = inputs["input_ids"].shape[1]
    with torch.no_grad(), tp.patch(model, method="glimpse", keep_ratio=0.25, layer=K):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, min_new_tokens=4)
        ids = out.sequences[:, P:]
        got = rl.completion_logits(model, inputs, ids, torch.ones_like(ids))
    want = torch.stack(out.logits, 1)  # generate returns them in float32
    torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-6, atol=1e-6)
    assert bool((got.argmax(-1) == ids).all())


def _oracle_logits(model, inputs, ids, mask, keep, layer, prefill_position):
    """The unpatched model over prompt + completion with per-layer masks: prompt rows after
    ``layer`` and completion rows at every layer see only the kept prompt tokens."""
    full = _full_inputs(inputs, ids, mask)
    valid = full["attention_mask"].bool()
    B, T = valid.shape
    P = inputs["input_ids"].shape[1]
    kept = torch.cat([keep, torch.ones_like(ids, dtype=torch.bool)], 1) & valid
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    is_completion = (torch.arange(T) >= P)[None, :, None]
    hooks = []
    for li, lyr in enumerate(model.model.language_model.layers):
        keys_late = kept[:, None, :].expand(B, T, T)
        keys_early = torch.where(is_completion, kept[:, None, :], valid[:, None, :])
        allowed = (keys_late if li > layer else keys_early) & causal
        allowed = allowed | torch.eye(T, dtype=torch.bool)  # no empty rows
        def pre(module, args, kwargs, m=allowed[:, None]):
            kwargs["attention_mask"] = m
            return args, kwargs
        hooks.append(lyr.register_forward_pre_hook(pre, with_kwargs=True))
    if prefill_position is not None:
        full["position_ids"] = prefill_position(model, full["attention_mask"])
    try:
        return model(**full).logits[:, P - 1:P + ids.shape[1] - 1]
    finally:
        for h in hooks:
            h.remove()


def test_lora_gradients_through_the_pruned_forward_equal_the_masked_oracle(lora_model):
    """float64: the LoRA gradients of a completion loss through the pruned prefill (compaction,
    pruned KV cache) equal those of the masked oracle; layers 0..K get gradient too."""
    model, make_inputs, prefill_position = lora_model
    inputs = make_inputs(7)
    ids, mask = _completion(inputs, seed=3)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}

    def loss_and_grads(logits):
        logp = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        grads = torch.autograd.grad((logp * w).sum(), list(lora.values()))
        return logp.detach(), dict(zip(lora, grads))

    with tp.patch(model, method="glimpse", keep_ratio=0.25, layer=K) as h:
        got_logp, got = loss_and_grads(rl.completion_logits(model, inputs, ids, mask))
        keep = h.keep_mask.clone()
    assert bool((~keep & inputs["attention_mask"].bool()).any())
    want_logp, want = loss_and_grads(_oracle_logits(model.get_base_model(), inputs, ids, mask, keep, K,
                                                     prefill_position))
    m = mask.bool()
    torch.testing.assert_close(got_logp[m], want_logp[m], rtol=1e-10, atol=1e-10)
    for name in lora:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)
    early = [n for n in lora if any(f"layers.{i}." in n for i in range(K + 1))]
    assert early and all(float(got[n].abs().max()) > 0 for n in early)


# -- the benchmark's processor, rewards -------------------------------------------------------

def test_small_lvlm_processor_equals_the_benchmark_processor():
    from token_prune.eval.small_lvlm import PRESETS, SmallVLMProcessor, small_config
    from token_prune.eval.synthetic import WordTokenizer, make_samples

    p = PRESETS["cpu"]
    tok = WordTokenizer.for_config(p.task)
    cfg = small_config(tok, p.model)
    proc = rl.small_lvlm_processor(tok, cfg)
    samples = make_samples(p.task, 0, 4, split="test")
    want = SmallVLMProcessor(tok, cfg).batch(samples, with_answer=False)
    conv = [[{"role": "user", "content": [{"type": "image", "image": s.image}, {"type": "text", "text": s.question}]}]
            for s in samples]
    got = proc.apply_chat_template(conversation=conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(got[k], want[k]), k
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    answer = [tok.ids[samples[0].answer], tok.eos_token_id, tok.pad_token_id]
    assert proc.batch_decode([answer], skip_special_tokens=True) == [samples[0].answer]


def test_rewards():
    comps = ["red", " Red ", "red.", "blue"]
    answers = ["red"] * 4
    assert rl.exact_match_reward(comps, answers) == [1.0, 0.0, 0.0, 0.0]
    assert rl.normalised_match_reward(comps, answers) == [1.0, 1.0, 0.0, 0.0]
    assert rl.normalised_match_reward([[{"role": "assistant", "content": "RED"}]], ["red"]) == [1.0]
    term = rl.keep_ratio_reward(0.5)
    assert term(comps, keep_ratio=[0.1, 0.2, 1.0, 0.0]) == [-0.05, -0.1, -0.5, -0.0]


# -- a short run ------------------------------------------------------------------------------

def _small_setup():
    from token_prune.eval.small_lvlm import PRESETS, build_small_lvlm
    from token_prune.eval.synthetic import WordTokenizer, make_samples
    from token_prune.vip import GlimpseConfig, GlimpseModules
    from token_prune.models import adapter_for

    p = PRESETS["test"]
    tok = WordTokenizer.for_config(p.task)
    model = build_small_lvlm(tok, p.model, seed=0)
    a = adapter_for(model)
    vip = GlimpseModules.random(GlimpseConfig(
        llm_hidden_size=a.hidden_size, llm_num_layers=a.num_layers, llm_num_heads=a.num_heads,
        llm_rms_norm_eps=a.lm_config.rms_norm_eps, vision_width=a.vision_width(),
        vision_layers=a.default_vision_layers(), layer=1, glimpse_score=a.glimpse_score, model_type=a.model_type),
        seed=0)
    return model, tok, rl.small_lvlm_processor(tok, model.config), vip, make_samples(p.task, 0, 12, split="train")


def _length_reward(completions, **kwargs):
    # varies between rollouts of a prompt, so advantages (and gradients) are non-zero
    return [float(len(rl._text(c).split())) for c in completions]


def test_train_rl_runs_checkpoints_and_resumes(tmp_path):
    model, tok, proc, vip, rows = _small_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(vip=vip, processor=proc, out_dir=tmp_path, prompts_per_step=2, max_new_tokens=3, progress=False,
              rewards=[_length_reward], lr=5e-2, save_every=2, prune_options=dict(keep_ratio=0.25), seed=1)
    res = rl.train_rl(model, rows, steps=2, **kw)
    assert res.step == 2 and tp.get_handle(res.model) is None
    assert os.path.isfile(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert [r["step"] for r in res.log] == [1, 2]
    for r in res.log:
        assert {"reward", "kl", "keep_ratio"} <= set(r)
        assert r["keep_ratio"] == pytest.approx(0.25)  # ceil(0.25 * 16) of the test preset's 16 tokens
    assert os.path.isfile(tmp_path / "rl_log.png")
    trained = {n: p.detach().clone() for n, p in res.model.named_parameters() if "lora_B" in n}
    assert any(bool(t.any()) for t in trained.values())  # B starts at 0: the adapters learned something
    base = res.model.get_base_model()
    res.model.unload()  # the LVLM's own weights are untouched
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())

    model2, *_ = _small_setup()
    res2 = rl.train_rl(model2, rows, steps=3, resume=True, **kw)
    assert res2.resumed_from == str(tmp_path / "checkpoint-2")
    assert res2.step == 3 and [r["step"] for r in res2.log] == [1, 2, 3]
    loaded = rl.load_rl_adapters(_small_setup()[0], tmp_path)
    assert any("lora_B" in n for n, _ in loaded.named_parameters())


def test_train_rl_refuses_bad_input(tmp_path):
    model, tok, proc, vip, rows = _small_setup()
    with pytest.raises(ValueError, match="num_generations"):
        rl.train_rl(model, rows, vip=vip, processor=proc, out_dir=tmp_path, num_generations=1)
    with tp.patch(model, method="fastv", layer=1):
        with pytest.raises(ValueError, match="patched"):
            rl.train_rl(model, rows, vip=vip, processor=proc, out_dir=tmp_path)
    assert tp.get_handle(model) is None


def test_package_imports_without_the_rl_extra():
    code = ("import sys; sys.modules['trl'] = None; sys.modules['peft'] = None\n"
            "import token_prune, token_prune.train.rl as rl\n"
            "try:\n    token_prune.train_rl(None, [], vip=None, processor=None, out_dir='x')\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install token_prune[rl]" in out.stdout


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    """bench/gpu/rl.sh --dry-run runs every command of the GPU script (test preset, tiny sizes) and
    writes the report with every row."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", os.path.join(root, "bench", "gpu", "rl.sh"), str(tmp_path), "--dry-run"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    assert [c.split("--stages ")[1].split()[0] for c in commands if "bench-rl" in c] == \
        ["vip", "rl_pruned", "rl_unpruned", "eval"]
    with open(tmp_path / "rl_test.json") as f:
        rep = json.load(f)
    assert [r["key"] for r in rep["results"]] == ["unpatched", "glimpse", "glimpse_plus", "glimpse_plus_unpruned",
                                                   "rl_unpruned", "rl_unpruned_glimpse"]
    assert rep["samples"] == 8 and set(rep["curves"]) == {"rl_pruned", "rl_unpruned"}
    assert all(len(c) == 2 for c in rep["curves"].values())
    for ext in ("md", "png"):
        assert os.path.isfile(tmp_path / f"rl_test.{ext}")
    bad = subprocess.run(["bash", os.path.join(root, "bench", "gpu", "rl.sh"), str(tmp_path), "--oops"],
                         cwd=root, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
