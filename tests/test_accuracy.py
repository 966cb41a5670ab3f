"""The accuracy-retention benchmark: synthetic grounded VQA, the word tokenizer, training a small
Qwen2.5-VL from scratch, eval-accuracy end to end, pictures, and random pruning."""

from __future__ import annotations

import dataclasses

import json
import math
import os
from collections import Counter

import pytest
import torch

import token_prune as tp
from token_prune import tiny
from token_prune.eval import synthetic
from token_prune.eval import (PRESETS, SmallVLMProcessor, build_small_lvlm, draw_token_picture, eval_accuracy,
                                  load_small_lvlm)
from token_prune.cli import main
from token_prune.eval.synthetic import COLORS, TASKS, TaskConfig, WordTokenizer, make_sample

pytestmark = pytest.mark.filterwarnings("ignore:token_prune. no trained VIP")

CFG = TaskConfig(image_sizes=(96, 160), unit=16, object_size=(16, 22), objects=(3, 5), colors=8, shapes=7,
                 letters=26, words=16, max_count=3)


def _dominant(image, box_px) -> tuple:
    """Most frequent saturated colour inside a pixel box (grey background / noise excluded)."""
    x0, y0, x1, y1 = box_px
    crop = image.crop((x0, y0, x1, y1))
    raw = crop.convert("RGB").tobytes()
    pixels = zip(raw[0::3], raw[1::3], raw[2::3])
    counts = Counter(p for p in pixels if max(p) - min(p) > 40 or max(p) < 40 or min(p) > 240)
    return counts.most_common(1)[0][0] if counts else None


def _px(sample, box):
    W, H = sample.image.size
    return (round(box[0] * W), round(box[1] * H), round(box[2] * W), round(box[3] * H))


# -- generator --------------------------------------------------------------------------------


def test_generator_is_deterministic_and_splits_differ():
    for i in (0, 7, 123):
        a, b = make_sample(CFG, 3, i), make_sample(CFG, 3, i)
        assert a.image.tobytes() == b.image.tobytes()
        assert (a.question, a.answer, a.box, a.boxes, a.task) == (b.question, b.answer, b.box, b.boxes, b.task)
    assert make_sample(CFG, 3, 1).image.tobytes() != make_sample(CFG, 3, 2).image.tobytes()
    assert make_sample(CFG, 3, 1).image.tobytes() != make_sample(CFG, 4, 1).image.tobytes()
    assert make_sample(CFG, 3, 1, "train").image.tobytes() != make_sample(CFG, 3, 1, "test").image.tobytes()


@pytest.mark.parametrize("task", [t for t in TASKS if t != "count"])
def test_one_object_configs_still_draw_every_task(task):
    """A curriculum's easy images ask for one object; "left of" still needs two."""
    cfg = dataclasses.replace(CFG, objects=(1, 1), tasks=tuple((t, 1.0) for t in TASKS if t != "count"))
    for i in range(6):
        s = make_sample(cfg, 0, i, task=task)
        shapes = [o for o in s.objects if o["shape"] != "sign"]  # a word question adds its sign
        assert len(shapes) == (2 if task == "left_of" else 1) and s.task == task


@pytest.mark.parametrize("task", TASKS)
def test_answers_and_boxes_match_the_drawn_image(task):
    for i in range(12):
        s = make_sample(CFG, 0, i, task=task)
        W, H = s.image.size
        assert CFG.image_sizes[0] <= W <= CFG.image_sizes[1] and W % CFG.unit == 0 and H % CFG.unit == 0
        assert s.task == task and s.box == s.boxes[0]
        assert len(s.answer.split()) == 1
        for b in s.boxes:
            assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
            # the answer region is a small part of the image
            assert (b[2] - b[0]) * (b[3] - b[1]) < 0.1
        by_box = {tuple(o["box"]): o for o in s.objects}
        target = by_box[tuple(_px(s, s.box))]
        dom = _dominant(s.image, _px(s, s.box))
        if task in ("color", "left_of"):
            assert dom == COLORS[s.answer]  # the colour drawn in the answer's box is the answer
            assert target["color"] == s.answer
        if task == "color":
            assert s.question.endswith(f"the {target['shape']}")
        if task == "shape":
            assert target["shape"] == s.answer and dom == COLORS[target["color"]]
            assert s.question.endswith(f"colored {target['color']}")
        if task == "letter":
            assert target["letter"] == s.answer and dom == COLORS[target["color"]]
            assert s.question.endswith(f"{target['color']} {target['shape']}")
        if task == "left_of":
            ref = by_box[tuple(_px(s, s.boxes[1]))]
            assert s.question.endswith(f"left of the {ref['shape']}")
            assert target["box"][2] <= ref["box"][0]  # entirely left of the reference
        if task == "count":
            shape = next(sh for sh in CFG.shape_names if synthetic._plural(sh) in s.question)
            assert int(s.answer) == len(s.boxes) == sum(o["shape"] == shape for o in s.objects)
            for b in s.boxes:
                assert by_box[tuple(_px(s, b))]["shape"] == shape
                assert _dominant(s.image, _px(s, b)) in COLORS.values()
        if task == "word":
            assert target["word"] == s.answer and dom[0] > 240  # a white sign
        # the box centre is inside the drawn object: not background grey
        cx, cy = (s.box[0] + s.box[2]) / 2 * W, (s.box[1] + s.box[3]) / 2 * H
        r, g, b_ = s.image.getpixel((int(cx), int(cy)))
        assert not (abs(r - g) < 12 and abs(g - b_) < 12 and 95 < r < 160), (task, i, (r, g, b_))


def test_tokenizer_round_trip_and_json(tmp_path):
    tok = WordTokenizer.for_config(CFG)
    for i in range(40):
        s = make_sample(CFG, 1, i)
        for text in (s.question, s.answer):
            ids = tok.encode(text, strict=True)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == WordTokenizer.normalize(text)
    assert tok.decode(tok.encode("what color") + [tok.eos_token_id] + tok.encode("star")) == "what color"
    tok.save(tmp_path)
    again = WordTokenizer.load(tmp_path)
    assert again.tokens == tok.tokens
    assert again.encode("what letter is in the red circle") == tok.encode("what letter is in the red circle")
    assert tok.encode("zebra") == [tok.unk_token_id]
    with pytest.raises(ValueError):
        tok.encode("zebra", strict=True)


def test_processor_layout_matches_the_model():
    p = PRESETS["test"]
    tok = WordTokenizer.for_config(p.task)
    model = build_small_lvlm(tok, p.model)
    proc = SmallVLMProcessor(tok, model.config)
    samples = [make_sample(p.task, 0, i) for i in range(3)]
    batch = proc.batch(samples, with_answer=True)
    n = (batch["input_ids"] == tok.image_token_id).sum(1)
    assert n.tolist() == [16, 16, 16]  # 64 px / 16 px = 4 x 4 tokens
    assert batch["answer_mask"].sum(1).tolist() == [2, 2, 2]  # one word + EOS
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "answer_mask"})
    assert out.logits.shape[:2] == batch["input_ids"].shape


# -- training and evaluation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("small_lvlm")
    assert main(["train-small-lvlm", "--preset", "test", "--out", str(out), "--steps", "24", "--quiet"]) == 0
    return out


def test_time_budget_shortens_the_run_and_its_schedule(tmp_path, monkeypatch):
    """--max-minutes: a budget far below the planned steps ends the run early, with the cosine
    schedule recomputed so that the last step's learning rate is back near its floor."""
    import token_prune.eval.train_small as acc

    clock = [0.0]
    monkeypatch.setattr(acc.time, "perf_counter", lambda: clock[0])
    real_step = acc._answer_loss

    def step_costs_one_second(*a, **k):
        clock[0] += 1.0
        return real_step(*a, **k)

    monkeypatch.setattr(acc, "_answer_loss", step_costs_one_second)
    lines = []
    # 40 "seconds" of budget; a training step and an evaluation (every 10 steps, one batch) cost one
    # second each. At the first evaluation (step 10): 11 s, 1.1 s/step, so 36 fit; the rate stays.
    summary = acc.train_small_lvlm(tmp_path, "test", steps=500, max_minutes=40 / 60, progress=False,
                                   log=lines.append)
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert summary["planned_steps"] == 500 and summary["steps"] == len(log) == 36
    assert [x for x in lines if "planned steps fit" in x] == [
        "time budget 0.667 min: 36 of 500 planned steps fit; shortening the run and its schedule"]
    spec = acc.PRESETS["test"].train
    assert log[-1]["lr"] < 0.05 * spec.lr + spec.min_lr_ratio * spec.lr  # annealed, not cut off mid-schedule
    assert "val_acc" in log[-1]  # the shortened run still ends with an evaluation
    with pytest.raises(ValueError, match="max_minutes"):
        acc.train_small_lvlm(tmp_path, "test", steps=5, max_minutes=0, progress=False, log=lines.append)


def test_short_training_lowers_the_loss_and_saves_a_loadable_checkpoint(trained):
    log = [json.loads(line) for line in open(trained / "train_log.jsonl")]
    assert len(log) == 24
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert last < 0.7 * first
    info = json.load(open(trained / "small_lvlm.json"))
    assert info["preset"]["name"] == "test" and info["steps"] == 24
    model, tok, proc, preset, _ = load_small_lvlm(trained)
    assert model.config.model_type == "qwen2_5_vl" and len(tok) <= model.config.text_config.vocab_size


def test_eval_accuracy_end_to_end_writes_json_md_png(trained, tmp_path):
    eval_accuracy(trained, out_dir=tmp_path, name="acc", samples=6, pictures=1, progress=False,
                        log=lambda *a: None)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"acc.{ext}").stat().st_size > 100
    data = json.load(open(tmp_path / "acc.json"))
    keys = [r["key"] for r in data["results"]]
    for k in ("unpatched", "glimpse_threshold", "alvts_cal@0.111", "alvts_svd@0.333", "fastv@0.222", "random@0.111"):
        assert k in keys
    by = {r["key"]: r for r in data["results"]}
    assert len(data["git_sha"]) == 40 and data["torch"] == torch.__version__  # provenance of the figures
    assert by["alvts_cal_drop@0.111"]["options"]["skipped"] == "drop"
    # the default per-group selector and the full-width one beside it, each calibrated
    assert by["alvts_cal@0.111"]["options"]["selector_form"] == "group_rope"
    assert by["alvts_fw_cal@0.111"]["options"]["selector_form"] == "full_width"
    assert by["alvts_fw_cal@0.111"]["options"]["selector"] == "calibrated" and by["alvts_fw_cal@0.111"]["status"] == "ok"
    assert by["alvts_fullrank_drop@0.111"]["options"]["skipped"] == "drop"
    assert by["unpatched"]["keep_ratio"] == 1.0 and by["unpatched"]["box_hit"] == 1.0
    assert 0.0 <= by["random@0.111"]["box_hit"] <= 1.0 and by["alvts_fullrank@0.111"]["status"] == "ok"
    for r in data["results"]:
        if r["status"] == "ok":
            assert 0.0 <= r["accuracy"] <= 1.0
    # fixed-ratio methods keep ceil(r * 16) of the 16 tokens of every image
    assert by["random@0.111"]["keep_ratio"] == pytest.approx(2 / 16)
    assert by["fastv@0.333"]["keep_ratio"] == pytest.approx(6 / 16)
    assert by["alvts_svd@0.222"]["keep_ratio"] == pytest.approx(4 / 16)
    if tp.__dict__.get("train_vip") is not None or _has_train_vip():
        assert by["glimpse_cap@0.111"]["status"] == "ok"
        assert by["glimpse_cap@0.111"]["keep_ratio"] <= 0.111 + 1e-9 or by["glimpse_cap@0.111"]["keep_ratio"] == 1 / 16
    else:
        assert by["glimpse_cap@0.111"]["status"] == "not run" and "train_vip" in by["glimpse_cap@0.111"]["note"]
    md = (tmp_path / "acc.md").read_text()
    assert "| method |" in md and "test preset" in md
    pics = os.listdir(tmp_path / "acc_pictures")
    assert len(pics) == 1 and pics[0].endswith(".png")


def _has_train_vip() -> bool:
    from token_prune.eval.accuracy import _vip_trainer

    return _vip_trainer() is not None


def test_demo_with_the_trained_model_writes_a_picture(trained, tmp_path, capsys):
    pic = tmp_path / "demo.png"
    assert main(["demo", "--trained", str(trained), "--method", "random", "--keep-ratio", "0.25",
                 "--samples", "1", "--picture", str(pic)]) == 0
    out = capsys.readouterr().out
    assert "truth:" in out and "kept 25.0%" in out
    assert pic.stat().st_size > 100


def test_token_picture_dims_pruned_cells():
    from PIL import Image

    img = Image.new("RGB", (32, 32), (200, 200, 200))
    pic = draw_token_picture(img, (2, 2), torch.tensor([1.0, 0.0, 0.5, 0.0]), scale=1)
    assert pic.size == (32, 32)
    kept, pruned, half = pic.getpixel((8, 8)), pic.getpixel((24, 8)), pic.getpixel((8, 24))
    assert kept[0] == 200 and pruned[0] == 50 and 120 < half[0] < 130


# -- random pruning ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.111, 0.3, 1.0])
def test_random_pruning_keeps_ceil_r_n_per_image(ratio):
    model = tiny.tiny_model("qwen2_5_vl", seed=0)
    samples = [tiny.SampleSpec(images=((128, 96),), prefix_len=3, suffix_len=6),
               tiny.SampleSpec(images=((64, 64), (32, 64)), prefix_len=5, suffix_len=4)]
    inputs = tiny.make_inputs(model, samples, seed=0)
    with torch.no_grad():
        with tp.patch(model, method="random", keep_ratio=ratio, seed=5) as h:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            stats, mask = h.stats, h.keep_mask.clone()
            assert h.options == dict(keep_ratio=ratio, layer=0, seed=5)
        for s in stats:
            for im in s["images"]:
                assert im["kept"] == min(im["tokens"], math.ceil(ratio * im["tokens"] - 1e-9))
        visual = inputs["input_ids"] == model.config.image_token_id
        assert mask[visual].sum() == sum(s["kept_tokens"] for s in stats)
        assert mask[~visual & inputs["attention_mask"].bool()].all()  # text is never dropped
        # a fresh patch with the same seed draws the same tokens, another seed others
        with tp.patch(model, method="random", keep_ratio=ratio, seed=5) as h:
            model(**inputs)
            same = h.keep_mask.clone()
        with tp.patch(model, method="random", keep_ratio=ratio, seed=6) as h:
            model(**inputs)
            other = h.keep_mask.clone()
    assert torch.equal(same, mask)
    if ratio < 1:
        assert not torch.equal(other, mask)


def test_random_pruning_rejects_bad_options():
    model = tiny.tiny_model("qwen2_5_vl", seed=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        tp.patch(model, method="random", keep_ratio=0.0)
    with pytest.raises(ValueError, match="layer"):
        tp.patch(model, method="random", keep_ratio=0.5, layer=99)
    assert "random" in tp.supported_methods()
