"""Exact-match accuracy of the unpatched model and of every method on held-out samples
(``token-prune eval-accuracy``), with a JSON + Markdown report and a plot."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
import warnings

import torch

from .synthetic import make_sample
from .pictures import _pictures
from .small_lvlm import PRESETS, KEEP_RATIOS, Preset, _to, load_small_lvlm
from .train_small import answer_accuracy


# --------------------------------------------------------------------------------------------
# eval-accuracy
# --------------------------------------------------------------------------------------------


def _fmt_opts(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _vip_trainer():
    """``token_prune.train_vip``, or None when it cannot be imported (a broken install: the report says so)."""
    try:
        from ..train import train_vip
    except Exception:  # noqa: BLE001 - not written yet, or broken: the rows say so
        return None
    return train_vip


def _with_current_eval(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        return dataclasses.replace(preset, eval=PRESETS[preset.name].eval)
    return preset


def vip_layer_of(model, preset: Preset) -> int:
    """K of the main GlimpsePrune rows: the preset's, else the package default for the model's depth."""
    if preset.eval.vip_layer is not None:
        return preset.eval.vip_layer
    from ..models import adapter_for

    return adapter_for(model).default_glimpse_layer()


def _prepare_vip(model, proc, preset: Preset, seed: int, ckpt: str, layer: int, log, progress: bool,
                 retrain: bool) -> tuple:
    """(VIP directory or None, note). Trains the VIP for layer K with ``train_vip`` unless a matching
    one is cached in ``ckpt/vip_K<layer>``."""
    train_vip = _vip_trainer()
    if train_vip is None:
        return None, "token_prune.train_vip could not be imported: GlimpsePrune not evaluated"
    e = preset.eval
    vdir = os.path.join(ckpt, f"vip_K{layer}")
    want = dict(layer=layer, rows=e.vip_rows, steps=e.vip_steps, batch_size=e.vip_batch_size, lr=e.vip_lr,
                objective=e.vip_objective, seed=seed)
    note = f"VIP trained by token_prune.train_vip (objective {e.vip_objective}, {e.vip_steps} steps x " \
           f"{e.vip_batch_size} rows, K={layer})"
    stamp = os.path.join(vdir, "accuracy_vip.json")
    if not retrain and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                log(f"using the VIP in {vdir}")
                return vdir, note
    from .synthetic import write_jsonl

    data_dir = os.path.join(ckpt, "vip_data")
    jsonl = os.path.join(data_dir, "data.jsonl")
    if not os.path.isfile(jsonl) or sum(1 for _ in open(jsonl)) != e.vip_rows:
        log(f"writing {e.vip_rows} VIP training rows to {data_dir}")
        # A range of train-split indices past what the LVLM saw (any would do; these are fresh).
        start = 50_000_000
        rows = [make_sample(preset.task, seed, start + i, "train") for i in range(e.vip_rows)]
        jsonl = write_jsonl(rows, data_dir)
    log(f"training the VIP with token_prune.train_vip: K={layer}, objective={e.vip_objective}, "
        f"{e.vip_steps} steps x {e.vip_batch_size} rows")
    t0 = time.perf_counter()
    res = train_vip(model, jsonl, layer=layer, out_dir=vdir, processor=proc, objective=e.vip_objective,
                    steps=e.vip_steps, batch_size=e.vip_batch_size, lr=e.vip_lr, seed=seed, progress=progress)
    hist = getattr(res, "history", []) or []
    with open(stamp, "w") as f:
        json.dump(dict(args=want, seconds=round(time.perf_counter() - t0, 1),
                       last=hist[-1] if hist else None), f, indent=2)
    return vdir, note


def _prepare_alvts(model, proc, preset: Preset, seed: int, ckpt: str, log, progress: bool, retrain: bool,
                   form: str = "group_rope"):
    """Directory of the ALVTS selector of ``form`` calibrated on val-split samples (cached in
    ``ckpt/alvts_selector`` for the default form, ``ckpt/alvts_selector_<form>`` otherwise)."""
    from ..alvts_calibration import calibrate_alvts
    from ..methods.alvts_selector import DEFAULT_FORM, default_rank
    from ..models import adapter_for

    e = preset.eval
    sdir = os.path.join(ckpt, "alvts_selector" if form == DEFAULT_FORM else f"alvts_selector_{form}")
    rank = default_rank(adapter_for(model), form)
    want = dict(samples=e.alvts_samples, steps=e.alvts_steps, batch_size=e.alvts_batch_size, seed=seed, form=form,
                rank=rank)
    stamp = os.path.join(sdir, "accuracy_alvts.json")
    if not retrain and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                log(f"using the ALVTS selector in {sdir}")
                return sdir
    log(f"calibrating the ALVTS {form} selector (rank {rank}) on {e.alvts_samples} val-split samples, "
        f"{e.alvts_steps} steps per layer")
    device = next(model.parameters()).device
    cal = [make_sample(preset.task, seed, i, "val") for i in range(e.alvts_samples)]
    batches = [_to(proc.batch(cal[i:i + e.alvts_batch_size], with_answer=False), device)
               for i in range(0, len(cal), e.alvts_batch_size)]
    t0 = time.perf_counter()
    calibrate_alvts(model, batches, rank=rank, steps=e.alvts_steps, out=sdir, progress=progress, seed=seed,
                    selector_form=form)
    with open(stamp, "w") as f:
        json.dump(dict(args=want, seconds=round(time.perf_counter() - t0, 1)), f, indent=2)
    return sdir


def _settings(preset: Preset, keep_ratios, vips: dict, selector_dir, methods=None,
              hidden: int | None = None, full_width_dir=None) -> list[dict]:
    """The rows to evaluate. ``vips``: K -> (VIP dir or None, note); the first K is the main one.
    ``selector_dir``: the calibrated default (per-group) ALVTS selector; ``full_width_dir``: the
    calibrated full-width one, reported beside it."""
    e = preset.eval
    rows = [dict(key="unpatched", label="unpatched", method=None, options={}, target=1.0)]
    layers = list(vips)
    if layers:
        K = layers[0]
        vdir, note = vips[K]
        for r in keep_ratios:
            rows.append(dict(key=f"glimpse_cap@{r}", label=f"GlimpsePrune K={K} (cap)", method="glimpse",
                             options=dict(vip=vdir, threshold=0.5, max_keep_ratio=r, layer=K), target=r, note=note))
        rows.append(dict(key="glimpse_threshold", label=f"GlimpsePrune K={K} (threshold)", method="glimpse",
                         options=dict(vip=vdir, threshold=0.5, layer=K), target=None, note=note))
        for K in layers[1:]:
            vdir, note = vips[K]
            rows.append(dict(key=f"glimpse_threshold_K{K}", label=f"GlimpsePrune K={K} (threshold)",
                             method="glimpse", options=dict(vip=vdir, threshold=0.5, layer=K), target=None,
                             note=note))
    # ALVTS under both readings of a skipped token (methods/alvts.py): "context" (default: still a
    # key/value for the others) and "drop" (invisible at that layer; smaller caches); the default
    # per-group selector, and the full-width one beside it.
    for skipped, tag in (("context", ""), ("drop", "_drop")):
        for r in keep_ratios:
            rows.append(dict(key=f"alvts_cal{tag}@{r}", label=f"ALVTS group_rope (calibrated, {skipped})",
                             method="alvts", options=dict(keep_ratio=r, selector=selector_dir, skipped=skipped),
                             target=r))
        for r in keep_ratios:
            rows.append(dict(key=f"alvts_svd{tag}@{r}", label=f"ALVTS group_rope (SVD only, {skipped})",
                             method="alvts", options=dict(keep_ratio=r, skipped=skipped), target=r))
        if skipped == "context":
            for r in keep_ratios:
                rows.append(dict(key=f"alvts_fw_cal@{r}", label="ALVTS full_width (calibrated, context)",
                                 method="alvts", options=dict(keep_ratio=r, selector=full_width_dir,
                                                              selector_form="full_width"), target=r))
            for r in keep_ratios:
                rows.append(dict(key=f"alvts_fw_svd@{r}", label="ALVTS full_width (SVD only, context)",
                                 method="alvts", options=dict(keep_ratio=r, selector_form="full_width"), target=r))
    # Diagnostics: what the low rank costs (exact per-head q/k: the full-rank score itself), and
    # what selecting at layer 0 costs under "drop".
    if hidden:
        for skipped, tag in (("context", ""), ("drop", "_drop")):
            for r in keep_ratios:
                rows.append(dict(key=f"alvts_fullrank{tag}@{r}", method="alvts", target=r,
                                 label=f"ALVTS {skipped}, full-rank q/k (diagnostic)",
                                 options=dict(keep_ratio=r, rank=hidden, selector_form="full_width", skipped=skipped)))
    for r in keep_ratios:
        rows.append(dict(key=f"alvts_cal_from1@{r}", label="ALVTS drop, calibrated, layer 0 unpruned (diagnostic)",
                         method="alvts", options=dict(keep_ratio=r, selector=selector_dir, start_layer=1,
                                                      skipped="drop"), target=r))
    for r in keep_ratios:
        rows.append(dict(key=f"fastv@{r}", label=f"FastV K={e.fastv_layer}", method="fastv",
                         options=dict(keep_ratio=r, layer=e.fastv_layer), target=r))
    for r in keep_ratios:
        rows.append(dict(key=f"random@{r}", label="random (after layer 0)", method="random",
                         options=dict(keep_ratio=r, layer=0, seed=0), target=r))
    if methods:
        rows = [s for s in rows if s["method"] is None or s["method"] in methods]
    return rows


def eval_accuracy(checkpoint, *, out_dir="bench/results", name: str | None = None, samples: int | None = None,
                  keep_ratios=KEEP_RATIOS, methods: list[str] | None = None, pictures: int = 0,
                  picture_ratio: float | None = None, device: str | None = None, threads: int | None = None,
                  retrain: bool = False, progress: bool = True, log=print, command: str | None = None) -> dict:
    """Exact-match accuracy on the held-out (``test``) split, unpatched and per pruning method.

    Args:
        checkpoint: a directory written by :func:`train_small_lvlm`.
        out_dir: where ``<name>.json`` / ``.md`` / ``.png`` go (and ``<name>_pictures/``).
        name: file stem (default ``accuracy_<preset>``).
        samples: held-out samples (default: the preset's).
        methods: evaluate only these (``glimpse``, ``alvts``, ``fastv``, ``random``).
        pictures: write a picture of the first ``pictures`` held-out samples.
        picture_ratio: the keep ratio shown in the pictures (default: the smallest).
        retrain: retrain the VIP and recalibrate ALVTS even when cached ones match.

    The VIP (trained with :func:`token_prune.train_vip`) and the ALVTS selector
    (:func:`token_prune.calibrate_alvts`) are cached inside ``checkpoint``.
    """
    import token_prune as tp
    from ..provenance import git_info

    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, proc, preset, info = load_small_lvlm(checkpoint, device=dev)
    seed = int(info.get("seed", 0))
    # The task and model come from the checkpoint; the evaluation settings from the current preset of
    # that name (they are benchmark settings, not part of the trained model).
    preset = _with_current_eval(preset)
    e = preset.eval
    n = samples or e.samples
    name = name or f"accuracy_{preset.name}"
    os.makedirs(out_dir, exist_ok=True)
    test = [make_sample(preset.task, seed, i, "test") for i in range(n)]
    grids = [proc.visual_tokens(s.image) for s in test[:50]]
    visual_tokens = sum(grids) / len(grids)
    t_start = time.perf_counter()

    want = set(methods) if methods else {"glimpse", "alvts", "fastv", "random"}
    vips: dict = {}
    main_k = vip_layer_of(model, preset)
    if "glimpse" in want:
        for K in [main_k] + [k for k in e.extra_vip_layers if k != main_k]:
            vips[K] = _prepare_vip(model, proc, preset, seed, os.fspath(checkpoint), K, log, progress, retrain)
    selector_dir = full_width_dir = None
    if "alvts" in want:
        selector_dir = _prepare_alvts(model, proc, preset, seed, os.fspath(checkpoint), log, progress, retrain)
        full_width_dir = _prepare_alvts(model, proc, preset, seed, os.fspath(checkpoint), log, progress, retrain,
                                        form="full_width")
    settings = _settings(preset, keep_ratios, vips, selector_dir, methods, hidden=model.config.text_config.hidden_size,
                         full_width_dir=full_width_dir)

    results = []
    full_acc = None
    for s in settings:
        row = dict(key=s["key"], label=s["label"], method=s["method"] or "none", target_keep=s["target"],
                   options={k: v for k, v in s["options"].items() if k not in ("vip", "selector")})
        if s["method"] == "alvts":
            row["options"]["selector"] = "calibrated" if s["options"].get("selector") else "svd"
        if s["method"] == "glimpse" and s["options"].get("vip") is None:
            row.update(status="not run", note=s.get("note"), accuracy=None, keep_ratio=None)
            results.append(row)
            log(f"{s['key']:<22} not run: {s.get('note')}")
            continue
        t0 = time.perf_counter()
        if s["method"] is None:
            res = answer_accuracy(model, proc, test, batch_size=e.batch_size)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle = tp.patch(model, method=s["method"], **s["options"])
            with handle:
                row["options"] = {**row["options"], **{k: v for k, v in handle.options.items()
                                                       if k not in ("selector",)}}
                res = answer_accuracy(model, proc, test, batch_size=e.batch_size, handle=handle)
        res.pop("answers")
        if full_acc is None:
            full_acc = res["accuracy"]
        row.update(status="ok", accuracy=res["accuracy"], keep_ratio=res["keep_ratio"], box_hit=res["box_hit"],
                   retained=(res["accuracy"] / full_acc) if full_acc else None, per_task=res["per_task"],
                   seconds=round(time.perf_counter() - t0, 1))
        if s.get("note"):
            row["note"] = s["note"]
        results.append(row)
        log(f"{s['key']:<22} accuracy {res['accuracy']:.3f}  kept {res['keep_ratio']:.3f}  "
            f"answer box kept {res['box_hit']:.3f}  "
            f"({row['seconds']:.0f}s)")

    report = dict(
        checkpoint=os.fspath(checkpoint), preset=preset.name, preset_description=preset.description,
        train_seed=seed, train_steps=info.get("steps"), train_seconds=info.get("train_seconds"),
        train_device=info.get("device"), eval_split="test", samples=n, keep_ratios=list(keep_ratios),
        visual_tokens=round(visual_tokens, 1),
        device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        cuda=torch.version.cuda, torch=torch.__version__, transformers=_tf_version(), **git_info(),
        task=preset.task.to_dict(),
        model=dataclasses.asdict(preset.model), vip_layer=main_k, vip_layers=list(vips), fastv_layer=e.fastv_layer,
        vip=[v[1] for v in vips.values()], seconds=round(time.perf_counter() - t_start, 1), command=command,
        results=results,
    )
    paths = dict(json=os.path.join(out_dir, f"{name}.json"), md=os.path.join(out_dir, f"{name}.md"),
                 png=os.path.join(out_dir, f"{name}.png"))
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(_markdown(report))
    _plot(report, paths["png"])
    if pictures:
        paths["pictures"] = _pictures(model, proc, test[:pictures], settings, keep_ratios, picture_ratio,
                                      os.path.join(out_dir, f"{name}_pictures"))
    report["files"] = paths
    for k, v in paths.items():
        log(f"wrote {v}")
    return report


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _markdown(rep: dict) -> str:
    full = next((r for r in rep["results"] if r["key"] == "unpatched"), None)
    lines = [
        f"# Accuracy retention: small Qwen2.5-VL on synthetic grounded VQA ({rep['preset']} preset)",
        "",
        f"Model: {rep['preset_description']}; trained from scratch, seed {rep['train_seed']}, "
        f"{rep['train_steps']} steps ({rep['train_seconds']} s on {rep['train_device']}). "
        f"Held-out `{rep['eval_split']}` split, {rep['samples']} samples, greedy exact match; "
        f"evaluated on {rep.get('gpu') or rep['device']} (torch {rep['torch']}, transformers {rep['transformers']}, "
        f"git {str(rep.get('git_sha', 'unknown'))[:10]}{' + local changes' if rep.get('git_dirty') else ''}).",
        "",
        f"Tasks: {', '.join(t for t, _ in rep['task']['tasks'])}; images {rep['task']['image_sizes'][0]}-"
        f"{rep['task']['image_sizes'][1]} px, {rep.get('visual_tokens', '?')} visual tokens per image (mean), "
        f"objects {rep['task']['object_size'][0]}-{rep['task']['object_size'][1]} px"
        + (", one per token cell" if rep['task'].get('align') else "") + ". "
        f"GlimpsePrune prunes after the layer K in its label, FastV after K={rep['fastv_layer']}, random pruning "
        "after layer 0; ALVTS selects before every layer. 'kept' is the mean fraction of visual tokens kept "
        "(ALVTS: processed per layer, averaged over layers); 'answer box kept' the share of samples where a "
        "token of the answer's box survived (ALVTS: was processed by at least half the layers); 'retained' "
        "is accuracy relative to the unpatched model.",
        "",
        "| method | options | target keep | kept | answer box kept | accuracy | retained | per task |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rep["results"]:
        opts = _fmt_opts({k: v for k, v in r["options"].items()
                          if v is not None and k not in ("min_keep",) and not (k == "start_layer" and v == 0)})
        tgt = "-" if r["target_keep"] is None else f"{r['target_keep']:.3f}"
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {opts} | {tgt} | - | - | not run | - | {r.get('note', '')} |")
            continue
        tasks = ", ".join(f"{k} {v:.2f}" for k, v in r["per_task"].items())
        ret = "-" if r.get("retained") is None else f"{100 * r['retained']:.1f}%"
        hit = "-" if r.get("box_hit") is None else f"{100 * r['box_hit']:.1f}%"
        lines.append(f"| {r['label']} | {opts} | {tgt} | {r['keep_ratio']:.3f} | {hit} | {100 * r['accuracy']:.1f}% | "
                     f"{ret} | {tasks} |")
    for note in rep.get("vip") or []:
        lines += ["", f"GlimpsePrune: {note}."]
    if full is not None:
        lines += ["", f"Command: `{rep['command']}`" if rep.get("command") else ""]
    return "\n".join(lines).rstrip() + "\n"


def _plot(rep: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional: JSON + Markdown still written
        warnings.warn("matplotlib is not installed: no accuracy plot")
        return
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    groups: dict[str, list] = {}
    full = None
    for r in rep["results"]:
        if r.get("status") != "ok":
            continue
        if r["key"] == "unpatched":
            full = r["accuracy"]
            continue
        if "diagnostic" in r["label"]:  # in the table only: the plot compares the methods
            continue
        groups.setdefault(r["label"], []).append((r["keep_ratio"], r["accuracy"]))
    markers = itertools.cycle("osD^v<>p*hXP")
    for label, pts in groups.items():
        pts.sort()
        xs, ys = [100 * p[0] for p in pts], [100 * p[1] for p in pts]
        ax.plot(xs, ys, marker=next(markers), label=label, linestyle="-" if len(pts) > 1 else "none", markersize=7)
    if full is not None:
        ax.axhline(100 * full, color="black", linestyle="--", linewidth=1, label=f"unpatched ({100 * full:.1f}%)")
    ax.set_xlabel("visual tokens kept (%, mean; ALVTS: processed per layer)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Accuracy vs keep ratio, small Qwen2.5-VL, {rep['preset']} preset, n={rep['samples']}")
    lows = [100 * a for pts in groups.values() for _, a in pts] + ([100 * full] if full is not None else [])
    ax.set_ylim(max(0, 10 * math.floor((min(lows) - 5) / 10)) if lows else 0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
