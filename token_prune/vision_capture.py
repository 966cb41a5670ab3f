"""Vision features seen by the runtime, matched to the prompt that uses them.

``generate`` encodes the images and the videos once, before its first forward (transformers 5.x),
and then calls the language model with embeddings only. So the runtime records every vision-tower
pass (the pooled features of the ViT blocks the method reads, the VIP's attention segments, the
visual items and their kind) and, at a pruned prefill, assembles the passes that fit the prompt:

* A pass holds one *kind* of visual input, ``"image"`` or ``"video"`` (the runtime tags it by
  the encoder method that ran it, ``get_image_features`` / ``get_video_features``); images and
  videos of one call are two passes. The prompt says which of its visual tokens are which kind,
  so its items are taken from the passes in prompt order, whatever the order of images and
  videos in each sample.
* An *item* (an image, or a whole video) is the unit of the keep rules and of ``handle.stats``;
  a *segment* is one attention segment of the VIP on its own 2D grid (an image is one segment,
  a video one per temporal group). Items are runs of consecutive segments.

Two ``generate`` paths call the prefill on a batch the vision pass never saw:

* ``num_beams > 1`` / ``num_return_sequences > 1`` repeat every prompt k times
  (``repeat_interleave``) after encoding the inputs once;
* ``use_cache=False`` runs the prefill again at every step, without a new vision pass.

Both are matched here: a batch whose rows come in groups of k identical prompts reuses the
features of one prompt per group, and the last features used serve the next prefill when no new
pass arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: vision passes kept between two prefills (images and videos of one call)
MAX_PASSES = 4
#: kinds of visual input, numbered as ``mm_token_type_ids`` numbers them (0 is text)
KIND_IDS = {"image": 1, "video": 2}


def layout_sizes(layout) -> list[int]:
    """Tokens per segment of a vision layout: a grid [n_segments, 2] or (positions [N, 2], lengths)."""
    if isinstance(layout, torch.Tensor):
        return (layout[:, 0] * layout[:, 1]).tolist()
    return [int(n) for n in layout[1]]


def select_images(feats: list[torch.Tensor], layout, images: list[int]):
    """The features and layout of segments ``images`` (indices into the pass's segments, any
    order, repeats allowed). ``feats``: per condition [N, C], segments concatenated."""
    sizes = layout_sizes(layout)
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in images]) if images else torch.zeros(0, dtype=torch.long)
    out = [f[rows.to(f.device)] for f in feats]
    if isinstance(layout, torch.Tensor):
        return out, layout[torch.tensor(images, dtype=torch.long, device=layout.device)]
    positions, _ = layout
    return out, (positions[rows.to(positions.device)], [sizes[i] for i in images])


@dataclass
class VisionPass:
    """One vision-tower pass, or the passes assembled for one prompt.

    Attributes:
        feats: per condition layer, [N, C] pooled features (segments concatenated).
        layout: the VIP segments: a grid [n_segments, 2] (rows, cols), or (positions [N, 2],
            tokens per segment).
        items: tokens of each item (an image, or a whole video).
        segments: segments of each item (1 for an image, temporal groups for a video).
        kinds: ``"image"`` or ``"video"`` per item; None: not tagged (matches either kind).
    """

    feats: list[torch.Tensor]
    layout: object
    items: list[int]
    segments: list[int]
    kinds: list[str] | None

    @property
    def tokens(self) -> int:
        return sum(self.items)

    def item_segments(self, item: int) -> list[int]:
        first = sum(self.segments[:item])
        return list(range(first, first + self.segments[item]))


def _repeat_factor(input_ids: torch.Tensor | None, mask: torch.Tensor | None) -> int:
    """The largest k such that the batch is k copies of each prompt in a row (generate's expansion)."""
    if input_ids is None:
        return 1
    B = input_ids.shape[0]
    for k in range(B, 1, -1):
        if B % k:
            continue
        groups = input_ids.view(B // k, k, -1)
        same = bool((groups == groups[:, :1]).all())
        if same and mask is not None:
            m = mask.view(B // k, k, -1)
            same = bool((m == m[:, :1]).all())
        if same:
            return k
    return 1


def _runs(row: list[int]) -> list[tuple[int, int]]:
    """(kind, length) of the runs of equal kinds in one row's visual tokens (text left out)."""
    out: list[tuple[int, int]] = []
    for k in row:
        if k == 0:
            continue
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out


def item_runs(kinds: torch.Tensor) -> tuple[list[int], list[str]]:
    """(tokens, kind) per item when no vision pass tells the items apart: every run of
    visual tokens of one kind in a row is taken as one item. ``kinds``: [B, S] 0 text, 1 image,
    2 video."""
    names = {v: k for k, v in KIND_IDS.items()}
    sizes, out_kinds = [], []
    for row in kinds.tolist():
        for k, n in _runs(row):
            sizes.append(n)
            out_kinds.append(names[k])
    return sizes, out_kinds


def _assemble(rows: list[list[int]], sources: dict[int, VisionPass]) -> VisionPass | None:
    """The items of ``sources`` (one pass per kind) in the order the prompt rows use them, or
    None when the token counts do not line up with item boundaries."""
    names = {v: k for k, v in KIND_IDS.items()}
    next_item = {k: 0 for k in sources}
    picks: list[tuple[int, int]] = []  # (kind, item) in prompt order
    for row in rows:
        for k, n in _runs(row):
            src = sources.get(k)
            if src is None:
                return None
            while n > 0:
                i = next_item[k]
                if i >= len(src.items) or src.items[i] > n:
                    return None
                picks.append((k, i))
                n -= src.items[i]
                next_item[k] = i + 1
    if any(next_item[k] != len(src.items) for k, src in sources.items()):
        return None
    feats, positions, grids, lengths = None, [], [], []
    grid_layout = all(isinstance(s.layout, torch.Tensor) for s in sources.values())
    parts: list[list[torch.Tensor]] = []
    for k, i in picks:
        src = sources[k]
        f, lay = select_images(src.feats, src.layout, src.item_segments(i))
        parts.append(f)
        if grid_layout:
            grids.append(lay)
        else:
            if isinstance(lay, torch.Tensor):  # a grid pass next to a positions pass
                from .vip import positions_from_grid

                lay = (positions_from_grid(lay), layout_sizes(lay))
            positions.append(lay[0])
            lengths += lay[1]
    n_cond = len(next(iter(sources.values())).feats)
    feats = [torch.cat([p[c] for p in parts]) if parts else next(iter(sources.values())).feats[c][:0]
             for c in range(n_cond)]
    if grid_layout:
        layout = torch.cat(grids) if grids else next(iter(sources.values())).layout[:0]
    else:
        layout = (torch.cat(positions), lengths)
    return VisionPass(feats, layout, [sources[k].items[i] for k, i in picks],
                      [sources[k].segments[i] for k, i in picks], [names[k] for k, _ in picks])


class VisionCaptures:
    """The vision passes of one patched model, and the one its last prefill used."""

    def __init__(self):
        self.passes: list[VisionPass] = []
        self.last: VisionPass | None = None
        self.last_visual: torch.Tensor | None = None  # [B, S] visual kinds of the last prefill

    def add(self, feats: list[torch.Tensor], layout, items: list[int] | None = None,
            segments: list[int] | None = None, kind: str | None = None) -> None:
        """Record a pass: ``feats`` per condition [N, C], ``layout`` its VIP segments, ``items``
        tokens per item and ``segments`` segments per item (default: one item per segment)."""
        sizes = layout_sizes(layout)
        if items is None:
            items, segments = sizes, [1] * len(sizes)
        if segments is None or sum(segments) != len(sizes) or sum(items) != sum(sizes):
            raise ValueError(f"token_prune: vision pass items {items} / segments {segments} do not match its "
                             f"layout's segments {sizes}")
        self.passes.append(VisionPass(feats, layout, list(items), list(segments),
                                      None if kind is None else [kind] * len(items)))
        del self.passes[:-MAX_PASSES]

    def clear(self) -> None:
        self.passes.clear()
        self.last = None
        self.last_visual = None

    def _continues_last(self, kinds: torch.Tensor) -> bool:
        """Whether ``kinds`` is the last prefill's prompt, possibly with text tokens appended
        (generate with ``use_cache=False`` re-runs the prefill on the growing sequence)."""
        prev = self.last_visual
        if prev is None or prev.shape[0] != kinds.shape[0] or prev.shape[1] > kinds.shape[1]:
            return False
        grown = kinds[:, prev.shape[1]:]
        return bool(torch.equal(kinds[:, :prev.shape[1]], prev.to(kinds.device))) and not bool(grown.any())

    def _source(self, kind: int, tokens: int, k: int) -> tuple[VisionPass, int] | None:
        """The newest pass of ``kind`` (or untagged) holding ``tokens`` (or ``tokens / k``) tokens."""
        name = {v: n for n, v in KIND_IDS.items()}[kind]
        for want_k in (1, k) if k > 1 else (1,):
            for p in reversed(self.passes):
                if (p.kinds is None or p.kinds[0] == name) and p.tokens * want_k == tokens:
                    return p, want_k
        return None

    def take(self, kinds: torch.Tensor, input_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             required: bool = True):
        """(features, layout, tokens per item, kind per item) for a prompt whose visual tokens
        are ``kinds`` [B, S] (0 text, 1 image, 2 video, or a bool visual mask: all images);
        (None, None, None, None) when nothing fits and ``required`` is False.

        ``input_ids`` / ``mask`` [B, S] let a batch of repeated prompts (beam search,
        several return sequences) reuse one prompt's features per group of identical rows.
        """
        kinds = kinds.long()
        k = _repeat_factor(input_ids, mask)
        reuse = self.last is not None and not self.passes and self._continues_last(kinds)
        if reuse:
            return self._use(self.last, kinds)
        rows = kinds.tolist()
        counts = {kid: int((kinds == kid).sum()) for kid in KIND_IDS.values()}
        sources, factors = {}, set()
        for kid, n in counts.items():
            if n:
                found = self._source(kid, n, k)
                if found is None:
                    break
                sources[kid], f = found
                factors.add(f)
        else:
            if len(factors) <= 1:
                f = factors.pop() if factors else 1
                # The passes encoded each distinct prompt once; give every copy its prompt's items.
                merged = _assemble(rows[::f], sources)
                if merged is not None and f > 1:
                    merged = _assemble([r for r in rows[::f] for _ in range(f)],
                                       {kid: _repeated(merged, kid, rows[::f], f) for kid in sources})
                if merged is not None:
                    return self._use(merged, kinds)
        seen = [f"{p.tokens} {p.kinds[0] if p.kinds else 'visual'}" for p in self.passes]
        self.passes.clear()
        if not required:
            return None, None, None, None
        want = ", ".join(f"{n} {name}" for name, kid in KIND_IDS.items() if (n := counts[kid]))
        raise RuntimeError(
            f"token_prune: the prompt has visual tokens ({want}) but no vision-tower pass of that size was seen "
            f"(seen: {', '.join(seen) or 'none'}). Pass pixel_values / pixel_values_videos to the patched model: "
            "vision features computed before patching cannot be used."
        )

    def _use(self, merged: VisionPass, kinds: torch.Tensor):
        self.passes.clear()
        self.last, self.last_visual = merged, kinds.detach().clone()
        return merged.feats, merged.layout, list(merged.items), list(merged.kinds)


def _repeated(merged: VisionPass, kind: int, rows: list[list[int]], k: int) -> VisionPass:
    """The items of ``kind`` of ``merged`` (assembled for the distinct prompts ``rows``), each
    prompt's items repeated ``k`` times in a row: the source for a batch of k copies per prompt."""
    name = {v: n for n, v in KIND_IDS.items()}[kind]
    order: list[int] = []
    item = 0
    for row in rows:
        tokens = sum(n for kk, n in _runs(row) if kk == kind)
        mine = []
        while tokens > 0:
            while merged.kinds[item] != name:
                item += 1
            mine.append(item)
            tokens -= merged.items[item]
            item += 1
        order += mine * k
    segs = [s for i in order for s in merged.item_segments(i)]
    feats, layout = select_images(merged.feats, merged.layout, segs)
    return VisionPass(feats, layout, [merged.items[i] for i in order], [merged.segments[i] for i in order],
                      [name] * len(order))


__all__ = ["KIND_IDS", "VisionCaptures", "VisionPass", "item_runs", "layout_sizes", "select_images"]
