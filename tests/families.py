"""The family table of the test suite: one row per supported model family.

A row says only what the shared contract tests (tests/test_contract.py) cannot derive from the
package itself: a batch of prompts that exercises the family's image layouts (two samples,
different image counts and sizes, so the batch is left padded), how ``generate`` numbers the
prompt and the decode positions (the masked oracle replays them by hand), and the tiny model's
decoder depth. Adding a family to the package adds one row here and gives it the whole contract
suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from reference_model import llama_decode_position, llama_prefill_position, qwen_decode_position
from token_prune.models import supported_models
from token_prune.tiny import SampleSpec, make_inputs, tiny_model


@dataclass(frozen=True)
class Family:
    """One row: a model family as the tests use it."""

    model_type: str
    #: prompts of the contract batch (sample 0 has one image, sample 1 two)
    samples: Callable[[], list[SampleSpec]]
    #: fn(model, mask [B, S+t]) -> position_ids of one new token, as generate computes them
    decode_position: Callable
    #: fn(model, mask [B, S]) -> prompt position_ids as generate passes them, or None when the
    #: model derives the same ones itself
    prefill_position: Callable | None = None
    #: a single image the family takes (tests that need one image of a valid size)
    image: tuple[int, int] = (64, 64)
    #: prompts of the contract batch with videos (sample 0 an image, sample 1 a video and then an
    #: image), for families that take videos; the contract runs a second time on them
    video_samples: Callable[[], list[SampleSpec]] | None = None
    #: an image the processor encodes as one row of ``pixel_values`` (None: ``image`` is one);
    #: transformers 5.17 repeats pixel_values row by row for beams, which scrambles the tiles of
    #: an image whose tiles are rows (InternVL), patched or not
    one_row_image: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    def with_videos(self) -> "Family":
        """This row with the video prompts as its contract batch."""
        return replace(self, samples=self.video_samples)

    def build(self, dtype=torch.float32, seed: int = 0, attn: str = "sdpa", **overrides):
        return tiny_model(self.model_type, attn_implementation=attn, dtype=dtype, seed=seed, **overrides)

    def inputs(self, model, samples=None, seed: int = 0) -> dict:
        return make_inputs(model, self.samples() if samples is None else samples, seed=seed)

    def prompt_positions(self, model, inputs) -> dict:
        """``position_ids`` to pass with a prompt so that it is numbered as generate numbers it."""
        if self.prefill_position is None:
            return {}
        return {"position_ids": self.prefill_position(model, inputs["attention_mask"])}


def qwen_samples() -> list[SampleSpec]:
    return [SampleSpec(images=((128, 96),), prefix_len=3, suffix_len=6),
            SampleSpec(images=((64, 64), (32, 64)), prefix_len=5, suffix_len=4)]


def qwen_video_samples() -> list[SampleSpec]:
    # A video of 4 frames (2 temporal groups) before an image, next to an image-only sample.
    return [SampleSpec(images=((64, 64),), prefix_len=3, suffix_len=6),
            SampleSpec(images=((32, 64),), videos=((4, 64, 32),), order=("video", "image"), prefix_len=5,
                       suffix_len=4)]


FAMILIES = {
    f.model_type: f for f in [
        Family("qwen2_5_vl", samples=qwen_samples, decode_position=qwen_decode_position, image=(64, 64),
               video_samples=qwen_video_samples),
        Family("qwen2_vl", samples=qwen_samples, decode_position=qwen_decode_position, image=(64, 64),
               video_samples=qwen_video_samples),
        Family("qwen3_vl", samples=qwen_samples, decode_position=qwen_decode_position, image=(64, 64),
               video_samples=qwen_video_samples),
        Family("qwen3_vl_moe", samples=qwen_samples, decode_position=qwen_decode_position, image=(64, 64),
               video_samples=qwen_video_samples),
        Family("llava",
               samples=lambda: [SampleSpec(images=((56, 56),), prefix_len=3, suffix_len=6),
                                SampleSpec(images=((56, 56), (56, 56)), prefix_len=5, suffix_len=4)],
               decode_position=llama_decode_position, prefill_position=llama_prefill_position, image=(56, 56)),
        Family("llava_next",
               samples=lambda: [SampleSpec(images=((112, 56),), prefix_len=3, suffix_len=6),
                                SampleSpec(images=((56, 112), (60, 60)), prefix_len=5, suffix_len=4)],
               decode_position=llama_decode_position, prefill_position=llama_prefill_position, image=(112, 112)),
        Family("internvl",
               # 3x2 tiles + thumbnail; one tile; 1x3 tiles + thumbnail
               samples=lambda: [SampleSpec(images=((64, 96),), prefix_len=3, suffix_len=6),
                                SampleSpec(images=((32, 32), (96, 32)), prefix_len=5, suffix_len=4)],
               decode_position=llama_decode_position, prefill_position=llama_prefill_position, image=(64, 64),
               one_row_image=(32, 32)),
        Family("llava_onevision",
               # a 2x2 canvas shrunk by anyres_max; a wide canvas, unpadded; one tile
               samples=lambda: [SampleSpec(images=((112, 112),), prefix_len=3, suffix_len=6),
                                SampleSpec(images=((60, 150), (56, 56)), prefix_len=5, suffix_len=4)],
               decode_position=llama_decode_position, prefill_position=llama_prefill_position, image=(112, 56),
               # a 3-frame video (3 VIP segments, one keep-rule item) before an image
               video_samples=lambda: [SampleSpec(images=((112, 112),), prefix_len=3, suffix_len=6),
                                      SampleSpec(images=((56, 56),), videos=((3, 56, 56),), order=("video", "image"),
                                                 prefix_len=5, suffix_len=4)]),
    ]
}


def family(model_type: str) -> Family:
    return FAMILIES[model_type]


def test_every_supported_family_has_a_row():
    assert sorted(FAMILIES) == supported_models()
