"""Vision features seen by the runtime, matched to the prompt that uses them.

``generate`` encodes the images once, before its first forward (transformers 5.x), and then
calls the language model with embeddings only. So the runtime records every vision-tower pass
(the pooled features of the ViT blocks the method reads, and each image's token layout) and, at
a pruned prefill, finds the pass whose token count fits the prompt. Two ``generate`` paths call
the prefill on a batch the vision pass never saw:

* ``num_beams > 1`` / ``num_return_sequences > 1`` repeat every prompt k times
  (``repeat_interleave``) after encoding the images once;
* ``use_cache=False`` runs the prefill again at every step, without a new vision pass.

Both are matched here: a batch whose rows come in groups of k identical prompts reuses the
features of one prompt per group, and the last features used serve the next prefill when no new
pass arrived.
"""

from __future__ import annotations

import torch

#: vision passes kept between two prefills (images and videos of one call)
MAX_PASSES = 4


def layout_sizes(layout) -> list[int]:
    """Tokens per image of a vision layout: a grid [n_images, 2] or (positions [N, 2], lengths)."""
    if isinstance(layout, torch.Tensor):
        return (layout[:, 0] * layout[:, 1]).tolist()
    return [int(n) for n in layout[1]]


def select_images(feats: list[torch.Tensor], layout, images: list[int]):
    """The features and layout of ``images`` (indices into the pass's images, any order, repeats
    allowed). ``feats``: per condition [N, C], images concatenated."""
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


class VisionCaptures:
    """The vision passes of one patched model, and the one its last prefill used."""

    def __init__(self):
        self.passes: list[tuple[list[torch.Tensor], object]] = []
        self.last = None
        self.last_visual: torch.Tensor | None = None  # [B, S] visual tokens of the last prefill

    def add(self, feats: list[torch.Tensor], layout) -> None:
        self.passes.append((feats, layout))
        del self.passes[:-MAX_PASSES]

    def clear(self) -> None:
        self.passes.clear()
        self.last = None
        self.last_visual = None

    def _continues_last(self, visual: torch.Tensor) -> bool:
        """Whether ``visual`` is the last prefill's prompt, possibly with text tokens appended
        (generate with ``use_cache=False`` re-runs the prefill on the growing sequence)."""
        prev = self.last_visual
        if prev is None or prev.shape[0] != visual.shape[0] or prev.shape[1] > visual.shape[1]:
            return False
        grown = visual[:, prev.shape[1]:]
        return bool(torch.equal(visual[:, :prev.shape[1]], prev.to(visual.device))) and not bool(grown.any())

    def take(self, visual: torch.Tensor, input_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             required: bool = True):
        """(features, layout, tokens per image) for a prompt whose visual tokens are ``visual``
        [B, S]; (None, None, None) when nothing fits and ``required`` is False.

        ``input_ids`` / ``mask`` [B, S] let a batch of repeated prompts (beam search,
        several return sequences) reuse one prompt's features per group of identical rows.
        """
        n_visual = int(visual.sum())
        k = _repeat_factor(input_ids, mask)
        reuse = self.last is not None and not self.passes and self._continues_last(visual)
        candidates = list(reversed(self.passes)) + ([self.last] if reuse else [])
        for feats, layout in candidates:
            sizes = layout_sizes(layout)
            if sum(sizes) == n_visual:
                return self._use(feats, layout, visual)
            if k > 1 and sum(sizes) * k == n_visual:
                # The pass encoded each distinct prompt once; give every copy its prompt's images.
                per_row = visual.sum(1).tolist()
                images, i = [], 0
                for g in range(len(per_row) // k):
                    first, tokens = i, 0
                    while tokens < per_row[g * k] and i < len(sizes):
                        tokens += sizes[i]
                        i += 1
                    if tokens != per_row[g * k]:
                        break
                    images += list(range(first, i)) * k
                else:
                    if i == len(sizes):
                        return self._use(*select_images(feats, layout, images), visual)
        counts = [sum(layout_sizes(layout)) for _, layout in candidates]
        self.passes.clear()
        if not required:
            return None, None, None
        raise RuntimeError(
            f"token_prune: the prompt has {n_visual} image tokens but no vision-tower pass of that size was seen "
            f"(seen: {counts or 'none'}). Pass pixel_values to the patched model: image features computed "
            "before patching cannot be used."
        )

    def _use(self, feats, layout, visual):
        self.passes.clear()
        self.last, self.last_visual = (feats, layout), visual.detach().clone()
        return feats, layout, layout_sizes(layout)


__all__ = ["VisionCaptures", "layout_sizes", "select_images"]
