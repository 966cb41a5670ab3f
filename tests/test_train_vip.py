"""GlimpsePrune stage 1 training (``token_prune.train_vip``) and evaluation (``evaluate_vip``).

Tiny random-weight models, synthetic data written by the tests (a flat grey background with one
or two saturated squares), CPU. In a random-weight model the *best* small subset of visual
tokens is an idiosyncratic, position-driven choice, so a comparison at a 25% budget mostly
measures noise; at a 75% budget the squares dominate (dropping one costs 10-100x more than
dropping a background token, by leave-one-out KL), which is the regime where "some tokens
clearly matter more" and a trained VIP must beat an untrained one. Measured on four data/init
seeds (data 10+s / 100+s, VIP seed s) with these settings: trained / untrained held-out KL
0.100/0.146, 0.078/0.240, 0.105/0.134, 0.161/0.206 (the test uses s=0).
"""

from __future__ import annotations

import functools

import copy
import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import token_prune as tp
from token_prune.data import (HFChatProcessor, TinyProcessor, VipRow, _map_boxes, box_targets, collate,
                              load_jsonl, make_synthetic_dataset, rasterise_boxes)
from token_prune.models import adapter_for
from token_prune.runtime import Runtime
from token_prune.tiny import tiny_model
from token_prune.train import SoftGlimpseStudent, evaluate_vip, train_vip
from token_prune.train.evaluate import _answer_logprobs
from token_prune.train.loop import _answer_rows
from token_prune.vip import GlimpseConfig, GlimpseModules

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

K = 2  # the tiny model's default K is 4: training here is at a non-default layer
KEEP = 0.75
SMALL_VIP = dict(hidden_size=32, cond_size=32, num_heads=2)
TRAIN = dict(layer=K, objective="kl", target_keep=KEEP, steps=60, batch_size=4, lr=3e-3, vip_options=SMALL_VIP,
             seed=0, progress=False)


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vip_data")
    return (make_synthetic_dataset(root / "train", 64, seed=10),
            make_synthetic_dataset(root / "held_out", 16, seed=100))


@pytest.fixture(scope="module")
def run(model, data, tmp_path_factory):
    """One training run (60 steps, K=2, KL objective), with a checkpoint at step 30."""
    out = tmp_path_factory.mktemp("vip_run")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = train_vip(model, data[0], out_dir=out, save_every=30, **TRAIN)
    return SimpleNamespace(res=res, out=str(out), before=before, flags=flags)


# -- training ---------------------------------------------------------------------------------

def test_training_lowers_the_loss(run, model):
    h = run.res.history
    assert len(h) == 60 and run.res.step == 60
    first = sum(r["loss"] for r in h[:5]) / 5
    last = sum(r["loss"] for r in h[-5:]) / 5
    print(f"\ntraining loss (KL to the full model), mean of 5 steps: {first:.4f} -> {last:.4f}")
    assert last < 0.6 * first
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in h)
    assert adapter_for(model).default_glimpse_layer() != K
    assert run.res.modules.config.layer == K


def test_trained_vip_beats_untrained_vip_on_held_out_rows(run, model, data):
    """KL of the pruned model's answers to the full model's, through the real patched path, at the
    same fixed keep ratio, on rows the VIP never saw."""
    trained = evaluate_vip(model, run.out, data[1], keep_ratio=KEEP, generate=False)
    untrained = evaluate_vip(model, GlimpseModules.random(run.res.modules.config, seed=0), data[1],
                             keep_ratio=KEEP, generate=False)
    print(f"\nheld-out KL at keep_ratio={KEEP}: trained {trained['kl']:.4f}, untrained {untrained['kl']:.4f}")
    assert trained["keep_ratio"] == pytest.approx(untrained["keep_ratio"])
    assert trained["layer"] == K
    assert trained["kl"] < 0.9 * untrained["kl"]
    # The threshold rule (calibrated during training) keeps about the target share.
    rule = evaluate_vip(model, run.out, data[1], limit=8)
    print(f"threshold rule: keep {rule['keep_ratio']:.3f}, KL {rule['kl']:.4f}, greedy match "
          f"{rule['greedy_match']:.3f}, token agreement {rule['token_agreement']:.3f}")
    assert abs(rule["keep_ratio"] - KEEP) < 0.2
    assert 0.0 <= rule["greedy_match"] <= 1.0 and 0.0 <= rule["token_agreement"] <= 1.0


def test_base_model_is_bit_identical_and_unpatched_after_training(run, model):
    state = model.state_dict()
    assert set(state) == set(run.before)
    assert all(torch.equal(state[k], v) for k, v in run.before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == run.flags
    assert tp.get_handle(model) is None
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert "get_image_features" not in model.model.__dict__


def test_checkpoints_load_with_patch(run, model, data):
    ckpt = os.path.join(run.out, "checkpoint-000030")
    assert os.path.isfile(os.path.join(ckpt, "trainer_state.pt"))
    assert os.path.isfile(os.path.join(run.out, "checkpoint-000060", "model.safetensors"))
    rows = load_jsonl(data[1])
    enc = TinyProcessor(model).encode(rows[0])
    for path in (run.out, ckpt):
        with torch.no_grad(), tp.patch(model, method="glimpse", vip=path, keep_ratio=0.5) as h:
            assert h.method.layer == K
            model(**enc.inputs)
            assert h.stats[0]["kept_tokens"] == math.ceil(0.5 * h.stats[0]["visual_tokens"])
    saved = GlimpseModules.load(run.out).state_dict()
    for k, v in run.res.modules.state_dict().items():
        assert torch.equal(saved[k], v.cpu()), k
    log = [json.loads(line) for line in open(os.path.join(run.out, "train_log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 61))


def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(run, model, data, tmp_path):
    shutil.copytree(os.path.join(run.out, "checkpoint-000030"), tmp_path / "checkpoint-000030")
    res = train_vip(model, data[0], out_dir=tmp_path, resume=True, **TRAIN)
    assert res.resumed_from.endswith("checkpoint-000030") and res.step == 60
    assert len(res.history) == 60
    assert res.history[:30] == run.res.history[:30]
    for a, b in zip(res.history[30:], run.res.history[30:]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    for k, v in run.res.modules.state_dict().items():
        torch.testing.assert_close(res.modules.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # Resuming a finished run is a no-op; different settings are refused.
    again = train_vip(model, data[0], out_dir=tmp_path, resume=True, **TRAIN)
    assert again.step == 60 and len(again.history) == 60
    with pytest.raises(ValueError, match="cannot resume.*lr"):
        train_vip(model, data[0], out_dir=tmp_path, resume=True, **dict(TRAIN, lr=1e-3))


# -- the soft-pruned student ------------------------------------------------------------------

@pytest.mark.parametrize("kind, layer", [("qwen2_5_vl", 0), ("qwen2_5_vl", K), ("qwen2_5_vl", 5), ("llava", K),
                                         ("llava_next", K), ("qwen3_vl", 1), ("qwen3_vl", K)])
def test_student_with_binary_keep_is_the_hard_pruned_model(kind, layer, data):
    """With keep probabilities in {0, 1} the student's teacher-forced answer distribution equals
    what the real pruned inference path (patch -> prefill -> decode on the pruned cache) gives."""
    from token_prune import tiny

    build = functools.partial(tiny.tiny_model, kind)
    model = build(dtype=torch.float64, seed=3)
    adapter = adapter_for(model)
    proc = TinyProcessor(model)
    rows = list(load_jsonl(data[1]))[:3]
    encs = [proc.encode(r) for r in rows]
    n_vis = [int((e.inputs["input_ids"] == adapter.image_token_id).sum()) for e in encs]
    gen = torch.Generator().manual_seed(layer)
    scores = [torch.where(torch.rand(n, generator=gen) < 0.4, 60.0, -60.0).double() for n in n_vis]
    for s in scores:
        s[0] = 60.0
    cfg = GlimpseConfig(llm_hidden_size=adapter.hidden_size, llm_num_layers=adapter.num_layers,
                        llm_num_heads=adapter.num_heads, vision_width=adapter.vision_width(),
                        vision_layers=adapter.default_vision_layers(), layer=layer,
                        glimpse_score=adapter.glimpse_score, **SMALL_VIP)
    base = GlimpseModules.random(cfg, seed=0).double()

    def with_scores(sc):
        m = copy.deepcopy(base)
        m.vip.forward = lambda *a, **k: sc
        return m

    for p in model.parameters():
        p.requires_grad_(False)
    mb = collate(encs, proc.pad_token_id)
    student = SoftGlimpseStudent(with_scores(torch.cat(scores)), layer, bias_floor=-1000.0)
    rt = Runtime(adapter_for(model), student)
    student.answer_mask = mb["answer_mask"]
    rt.install()
    try:
        with torch.no_grad():
            logits = model(**mb["inputs"], use_cache=False, logits_to_keep=int(mb["answer_lens"].max()) + 1).logits
    finally:
        rt.remove()
    got = _answer_rows(logits, mb["answer_lens"]).log_softmax(-1)
    ref = []
    for enc, sc in zip(encs, scores):
        with torch.no_grad(), tp.patch(model, method="glimpse", vip=with_scores(sc), threshold=0.5) as h:
            ref.append(_answer_logprobs(model, enc, "cpu", torch.float64))
            assert 0 < h.stats[0]["kept_tokens"] < h.stats[0]["visual_tokens"]
    # float32 pieces of HF's vision tower / rotary tables differ between a batch and single rows.
    torch.testing.assert_close(got, torch.cat(ref), rtol=0, atol=1e-5)
    # And with everything kept the student is the full model.
    full = torch.cat([_answer_logprobs(model, e, "cpu", torch.float64) for e in encs])
    with torch.no_grad():
        t = model(**mb["inputs"], use_cache=False, logits_to_keep=int(mb["answer_lens"].max()) + 1).logits
    torch.testing.assert_close(_answer_rows(t, mb["answer_lens"]).log_softmax(-1), full, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_training(model, data):
    kw = dict(layer=K, steps=2, batch_size=2, lr=3e-3, vip_options=SMALL_VIP, progress=False)
    plain = train_vip(model, data[0], **kw)
    ckpt = train_vip(model, data[0], gradient_checkpointing=True, **kw)
    for a, b in zip(plain.history, ckpt.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k, v in plain.modules.state_dict().items():
        torch.testing.assert_close(ckpt.modules.state_dict()[k], v, rtol=1e-5, atol=1e-7)


# -- objectives with boxes --------------------------------------------------------------------

def test_box_rasterisation_hand_computed():
    m = rasterise_boxes([[0.0, 0.0, 0.25, 0.5]], rows=2, cols=4).view(2, 4)
    assert m.tolist() == [[True, False, False, False], [False, False, False, False]]
    m = rasterise_boxes([[0.3, 0.6, 0.55, 0.9]], rows=2, cols=4).view(2, 4)  # overlaps cols 1-2, row 1
    assert m.tolist() == [[False, False, False, False], [False, True, True, False]]
    m = rasterise_boxes([[0.5, 0.5, 0.5001, 0.5001]], rows=2, cols=2).view(2, 2)  # a tiny box marks its cell
    assert m.tolist() == [[False, False], [False, True]]
    # A grid layout, and a LLaVA-NeXT-style one: 2x2 base grid, then a 1x2 grid + newline column.
    t = box_targets(torch.tensor([[2, 2], [1, 2]]), [[[0.0, 0.0, 0.5, 0.5]], None])
    assert t[0].tolist() == [1, 0, 0, 0] and t[1] is None
    pos = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 1], [0, 2]])
    t = box_targets((pos, [7]), [[[0.5, 0.0, 1.0, 1.0]]], newline_column=True)
    assert t[0].tolist() == [0, 1, 0, 1, 0, 1, 0]


def test_boxes_follow_a_center_crop():
    class Crop:  # a CLIP-style image processor: shortest edge 10, center crop 10x10
        do_center_crop = True
        crop_size = {"height": 10, "width": 10}
        size = {"shortest_edge": 10}

    # A 20x10 (w x h) image: the crop keeps x in [5, 15) of the resized 20x10.
    out = _map_boxes([[0.25, 0.0, 0.5, 1.0], [0.0, 0.0, 0.2, 1.0]], (20, 10), Crop())
    assert out == [[0.0, 0.0, 0.5, 1.0]]  # the second box lies outside the crop


def test_mask_objective_trains_on_boxes(model, data):
    res = train_vip(model, data[0], layer=K, objective="mask", steps=4, batch_size=4, lr=3e-3,
                    vip_options=SMALL_VIP, progress=False)
    assert all(r["dice"] > 0 and r["bce"] > 0 and r["ce"] > 0 and r["kl"] == 0 for r in res.history)
    assert all(math.isfinite(r["loss"]) for r in res.history)


# -- data -------------------------------------------------------------------------------------

GOOD = {"image": "img.png", "question": "what is it ?", "answer": "a red square", "boxes": [[0.1, 0.1, 0.5, 0.5]]}


@pytest.mark.parametrize("line, exc, match", [
    ("not json", ValueError, "not valid JSON"),
    ('["a list"]', ValueError, "must be a JSON object"),
    (json.dumps({"image": "img.png", "question": "q"}), ValueError, r"missing key\(s\) \['answer'\]"),
    (json.dumps(dict(GOOD, question=3)), ValueError, "'question' must be a string"),
    (json.dumps(dict(GOOD, answer="  ")), ValueError, "'answer' is empty"),
    (json.dumps(dict(GOOD, colour="red")), ValueError, "unknown key"),
    (json.dumps(dict(GOOD, boxes=[[0.6, 0.1, 0.5, 0.5]])), ValueError, r"boxes\[0\].*0 <= x0 < x1 <= 1"),
    (json.dumps(dict(GOOD, boxes=[[0.1, 0.1, 0.5]])), ValueError, r"boxes\[0\] must be 4 numbers"),
    (json.dumps(dict(GOOD, boxes=[[0.1, 0.1, 0.5, 1.5]])), ValueError, r"boxes\[0\]"),
    (json.dumps(dict(GOOD, boxes="none")), ValueError, "'boxes' must be a list"),
    (json.dumps(dict(GOOD, image="missing.png")), FileNotFoundError, "image file not found"),
    (b"\xff\xfe{}", ValueError, "not valid UTF-8"),
])
def test_bad_rows_raise_naming_the_row(tmp_path, line, exc, match):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    path = tmp_path / "rows.jsonl"
    line = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(exc, match=match) as info:
        load_jsonl(path)
    assert f"{path}:3" in str(info.value)


def test_unreadable_image_raises_naming_the_row(model, tmp_path):
    (tmp_path / "img.png").write_bytes(b"not a png")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: cannot read image"):
        train_vip(model, str(path), layer=K, steps=1, batch_size=1, vip_options=SMALL_VIP, progress=False)
    assert tp.get_handle(model) is None and all("forward" not in m.__dict__ for m in model.modules())


def test_bad_settings_raise(model, data):
    with pytest.raises(ValueError, match="layer must be an int in \\[0, 5\\]"):
        train_vip(model, data[0], layer=6, progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        train_vip(model, data[0], objective="nope", progress=False)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train_vip(model, data[0], resume=True, progress=False)
    rows = [{"image": r.image, "question": r.question, "answer": r.answer} for r in load_jsonl(data[0])][:4]
    with pytest.raises(ValueError, match="no row .* has 'boxes'"):
        train_vip(model, rows, objective="mask", progress=False)


def test_tiny_processor_pixels_match_the_hf_image_processor(model, tmp_path):
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(48, 80, 3, generator=gen) * 255).to(torch.uint8).numpy())
    img.save(tmp_path / "x.png")
    ip = pil.Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, do_resize=False,
                                      image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref = ip([img], return_tensors="pt")
    enc = TinyProcessor(model).encode(VipRow(str(tmp_path / "x.png"), "q", "a", None, "x"))
    assert torch.equal(enc.inputs["image_grid_thw"], ref["image_grid_thw"])
    torch.testing.assert_close(enc.inputs["pixel_values"], ref["pixel_values"].float(), rtol=0, atol=1e-6)
    assert int((enc.inputs["input_ids"] == model.config.image_token_id).sum()) == 6 * 10 // 4


def test_hf_chat_processor_splits_prompt_and_answer(tmp_path):
    """HFChatProcessor with an HF-style processor (chat template + image-token expansion)."""
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    vocab = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "user", "assistant", "what", "is", "it", "?",
             "red", "square"]
    ids = {t: i for i, t in enumerate(vocab)}

    class Tok:
        pad_token_id, eos_token_id, eos_token = 0, 2, "<|im_end|>"

    class Proc:  # renders like Qwen's template; each image is 4 image tokens
        tokenizer = Tok()

        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=False):
            out = ""
            for m in msgs:
                body = " ".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
                out += f"<|im_start|> {m['role']} {body} <|im_end|> "
            return out + ("<|im_start|> assistant " if add_generation_prompt else "")

        def __call__(self, text, images, return_tensors):
            toks = []
            for w in text[0].split():
                toks += [ids[w]] * (4 if w == "<image>" else 1)
            return {"input_ids": torch.tensor([toks]), "attention_mask": torch.ones(1, len(toks), dtype=torch.long),
                    "pixel_values": torch.zeros(16, 3)}

    enc = HFChatProcessor(Proc()).encode(VipRow(str(tmp_path / "img.png"), "what is it ?", "red square", None, "r:1"))
    words = [vocab[i] for i in enc.answer_ids.tolist()]
    assert words == ["red", "square", "<|im_end|>"]  # cut after the end-of-turn token
    prompt = [vocab[i] for i in enc.inputs["input_ids"][0, :enc.prompt_len].tolist()]
    assert prompt == ["<|im_start|>", "user"] + ["<image>"] * 4 + ["what", "is", "it", "?", "<|im_end|>",
                                                                   "<|im_start|>", "assistant"]
    assert enc.inputs["pixel_values"].shape == (16, 3)


# -- LLaVA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_llava_families_train_and_evaluate(kind, data, tmp_path):
    from token_prune import tiny

    model = tiny.tiny_model(kind, seed=0)
    rows = list(load_jsonl(data[1]))[:8]
    res = train_vip(model, rows, layer=K, out_dir=tmp_path, steps=3, batch_size=4, lr=3e-3, target_keep=0.5,
                    vip_options=SMALL_VIP, progress=False)
    assert res.modules.config.layer == K and res.modules.config.glimpse_score == "log_softmax"
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in res.history)
    rep = evaluate_vip(model, str(tmp_path), rows[:2], keep_ratio=0.5, max_new_tokens=2)
    assert rep["samples"] == 2 and math.isfinite(rep["kl"]) and rep["kl"] >= 0 and 0 < rep["keep_ratio"] < 1


# -- command line -----------------------------------------------------------------------------

def test_cli_train_vip_and_eval_vip(tmp_path, capsys):
    from token_prune.cli import main

    out = str(tmp_path / "vip")
    assert main(["train-vip", "--tiny", "--out", out, "--steps", "2", "--batch-size", "2", "--synthetic-rows", "4",
                 "--layer", "1", "--target-keep", "0.5", "--save-every", "1", "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-000001",
                                                                                 "checkpoint-000002"]
    assert main(["train-vip", "--tiny", "--out", out, "--steps", "2", "--batch-size", "2", "--synthetic-rows", "4",
                 "--layer", "1", "--target-keep", "0.5", "--save-every", "1", "--no-progress", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    report = str(tmp_path / "eval.json")
    assert main(["eval-vip", "--tiny", "--vip", out, "--synthetic-rows", "2", "--keep-ratio", "0.5",
                 "--max-new-tokens", "2", "--json", report, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "KL(full || pruned)" in text and "greedy answers equal" in text
    assert json.load(open(report))["samples"] == 2
    assert main(["train-vip", "--tiny", "--out", out, "--data", str(tmp_path / "nope.jsonl"), "--no-progress"]) == 2
    assert "data file not found" in capsys.readouterr().err
