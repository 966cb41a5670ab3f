"""Pictures of what a method kept: each image with its token grid, pruned cells dimmed."""

from __future__ import annotations

import math
import os
import warnings

import torch

from .synthetic import Sample
from .small_lvlm import _to


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def draw_token_picture(image, grid: tuple[int, int], weight, box=None, title: str | None = None, scale: int = 2):
    """The image with its visual-token grid drawn over it.

    Args:
        image: PIL RGB image.
        grid: (rows, cols) of the image's visual tokens.
        weight: per token (row-major, rows*cols) a number in [0, 1]: 1 kept / always processed,
            0 pruned (drawn dimmed to 25 % brightness), in between (ALVTS: the fraction of
            layers that processed the token) shaded in proportion.
        box: the answer's normalised box, outlined in green.
        title: a line of text above the picture.
        scale: upscaling factor (nearest neighbour, so pixels stay crisp).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rows, cols = grid
    W, H = image.size
    w = torch.as_tensor(weight, dtype=torch.float32).reshape(rows, cols).clamp(0, 1)
    cell_h, cell_w = H / rows, W / cols
    ys = (torch.arange(H) / cell_h).long().clamp(max=rows - 1)
    xs = (torch.arange(W) / cell_w).long().clamp(max=cols - 1)
    factor = (0.25 + 0.75 * w)[ys][:, xs].numpy()[..., None]
    px = np.asarray(image.convert("RGB"), dtype=np.float32) * factor
    out = Image.fromarray(px.clip(0, 255).astype(np.uint8)).resize((W * scale, H * scale), Image.NEAREST)
    d = ImageDraw.Draw(out)
    for r in range(rows + 1):
        y = round(r * cell_h * scale)
        d.line([(0, y), (W * scale, y)], fill=(70, 70, 70), width=1)
    for c in range(cols + 1):
        x = round(c * cell_w * scale)
        d.line([(x, 0), (x, H * scale)], fill=(70, 70, 70), width=1)
    # Kept cells get a bright outline so they read at a glance.
    for r in range(rows):
        for c in range(cols):
            if w[r, c] >= 0.999:
                x0, y0 = round(c * cell_w * scale), round(r * cell_h * scale)
                d.rectangle([x0, y0, round((c + 1) * cell_w * scale) - 1, round((r + 1) * cell_h * scale) - 1],
                            outline=(255, 235, 60))
    if box is not None:
        x0, y0, x1, y1 = box
        d.rectangle([x0 * W * scale, y0 * H * scale, x1 * W * scale - 1, y1 * H * scale - 1], outline=(40, 230, 60),
                    width=2)
    if title:
        lines = title.split("\n")
        pad = 13 * len(lines) + 4
        canvas = Image.new("RGB", (out.width, out.height + pad), (255, 255, 255))
        canvas.paste(out, (0, pad))
        dd = ImageDraw.Draw(canvas)
        from .synthetic import _font

        for i, line in enumerate(lines):
            dd.text((3, 2 + 13 * i), line, fill=(0, 0, 0), font=_font(11))
        out = canvas
    return out


def _box_cells(box, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols] bool: token cells a normalised box overlaps with positive area (at least its centre's)."""
    x0, y0, x1, y1 = box
    c0, r0 = min(cols - 1, int(x0 * cols)), min(rows - 1, int(y0 * rows))
    c1, r1 = max(c0 + 1, min(cols, math.ceil(x1 * cols - 1e-9))), max(r0 + 1, min(rows, math.ceil(y1 * rows - 1e-9)))
    m = torch.zeros(rows, cols, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m.flatten()


def _token_weights(handle, inputs: dict, b: int) -> torch.Tensor:
    """Per visual token of sample ``b`` (prompt order = row-major grid): 1 kept, 0 pruned; ALVTS: the
    fraction of layers that processed it."""
    visual = inputs["mm_token_type_ids"][b] == 1
    processed = getattr(handle.method, "last_processed", None)
    if processed:
        stack = torch.stack([p[b] for p in processed]).float()  # [layers, S]
        return stack.mean(0)[visual].cpu()
    return handle.keep_mask[b][visual].float().cpu()


def _compose(panels, columns: int = 4):
    from PIL import Image

    w = max(p.width for p in panels)
    h = max(p.height for p in panels)
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * w + (columns - 1) * 6, rows * h + (rows - 1) * 6), (255, 255, 255))
    for i, p in enumerate(panels):
        sheet.paste(p, ((i % columns) * (w + 6), (i // columns) * (h + 6)))
    return sheet



def _pictures(model, proc, samples: list[Sample], settings, keep_ratios, ratio, out_dir) -> str:
    """One PNG per sample: the image with the answer box, then each method's kept tokens."""
    import token_prune as tp

    os.makedirs(out_dir, exist_ok=True)
    ratio = ratio if ratio is not None else min(keep_ratios)
    chosen = [s for s in settings if s["method"] is not None and "diagnostic" not in s["label"]
              and (s["target"] is None or abs(s["target"] - ratio) < 1e-9)]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tok = proc.tokenizer
    inputs = _to(proc.batch(samples, with_answer=False), device, dtype)
    grids = [proc.token_grid(s.image) for s in samples]
    plen = inputs["input_ids"].shape[1]
    panels = [[] for _ in samples]

    def answers(out):
        return [tok.decode(g) for g in out[:, plen:].tolist()]

    with torch.no_grad():
        full = answers(model.generate(**inputs, max_new_tokens=3, do_sample=False))
    for b, s in enumerate(samples):
        panels[b].append(draw_token_picture(s.image, grids[b], torch.ones(grids[b][0] * grids[b][1]), box=s.box,
                                            title=f"{s.question}\nunpatched: {full[b]} (truth: {s.answer})"))
    for st in chosen:
        if st["method"] == "glimpse" and st["options"].get("vip") is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = tp.patch(model, method=st["method"], **st["options"])
        with handle, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            # generate's last prefill is the prompt: keep_mask / last_processed describe it.
            got = answers(out)
            for b, s in enumerate(samples):
                w = _token_weights(handle, inputs, b)
                kept = handle.stats[b]
                frac = (sum(kept["processed_ratio"]) / len(kept["processed_ratio"]) if "processed_ratio" in kept
                        else kept["keep_ratio"])
                mark = "ok" if got[b] == tok.normalize(s.answer) else "WRONG"
                label = st["label"] + (f" r={st['target']}" if st["target"] is not None else "")
                panels[b].append(draw_token_picture(s.image, grids[b], w, box=s.box,
                                                    title=f"{label}\n{got[b]} [{mark}], kept {100 * frac:.0f}%"))
    for b, s in enumerate(samples):
        _compose(panels[b]).save(os.path.join(out_dir, f"sample_{s.index:03d}_{s.task}.png"), optimize=True)
    return out_dir
