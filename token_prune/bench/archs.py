"""Benchmark architectures: the shipped configs, full-size models with random weights built on
the device, and synthetic inputs of any supported family."""

from __future__ import annotations

import copy
import json
import os
import warnings
from importlib import resources

import torch

from .. import hf
from .settings import BenchError


# ======================================================================================
# Architectures
# ======================================================================================


def list_archs() -> list[str]:
    """Names of the architecture configs shipped in ``token_prune/configs``."""
    root = resources.files("token_prune").joinpath("configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_arch(name: str) -> dict:
    """A shipped architecture (``qwen2_5_vl_7b``...) or a JSON file of the same format."""
    if os.path.isfile(name):
        with open(name) as f:
            arch = json.load(f)
    else:
        res = resources.files("token_prune").joinpath("configs", f"{name}.json")
        if not res.is_file():
            raise BenchError(f"unknown model {name!r}; shipped: {', '.join(list_archs())} (or a path to a JSON file)")
        arch = json.loads(res.read_text())
    if arch.get("format") != "token_prune.arch/1":
        raise BenchError(f"{name}: not a token_prune.arch/1 config")
    return arch


def hf_config(arch: dict):
    """A fresh transformers config object for ``arch``."""
    import transformers

    cls = getattr(transformers, arch["config_class"])
    return cls(**copy.deepcopy(arch["config"]))


@torch.no_grad()
def init_random_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Re-initialise every parameter in place, on its own device: norms to 1 (bias 0), biases
    to 0, everything else ``N(0, std)``. Deterministic for a seed and independent of how the
    transformers version initialises weights."""
    gens: dict = {}
    for module in model.modules():
        is_norm = (
            isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()
        )
        for name, p in module.named_parameters(recurse=False):
            if p.device.type == "meta":
                continue
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.zero_()
            else:
                g = gens.get(p.device)
                if g is None:
                    g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.normal_(0.0, std, generator=g)


def build_model(
    arch: dict, *, tiny: bool = False, device="cuda", dtype=torch.bfloat16, attn: str = "sdpa", seed: int = 0
):
    """The benchmark model: the full-size architecture with random weights, or its tiny twin.

    Full size: the modules are constructed under ``torch.device(device)``, so every parameter and
    buffer is allocated on that device from the start, then :func:`init_random_` fills the
    parameters in place. ``device="meta"`` builds the structure without memory (for counting).
    """
    if tiny:
        from ..tiny import tiny_model

        model = tiny_model(arch["family"], attn_implementation=attn, dtype=dtype, seed=seed, device=device)
    else:
        import transformers

        config = hf_config(arch)
        cls = getattr(transformers, arch["model_class"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device(device):
                model = hf.model_from_config(cls, config, attn_implementation=attn, dtype=dtype)
        init_random_(model, std=getattr(config.text_config, "initializer_range", 0.02), seed=seed)
        model.eval()
    gcfg = model.generation_config
    gcfg.eos_token_id = None  # random weights: never stop early
    pad = getattr(model.config.text_config, "pad_token_id", None)
    gcfg.pad_token_id = pad if pad is not None else 0
    gcfg.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gcfg, key):
            setattr(gcfg, key, None)
    return model


# ======================================================================================
# Inputs
# ======================================================================================


def synthetic_inputs(
    model, image_hw: tuple[int, int], batch: int, text_before: int, text_after: int, seed: int = 0, device=None,
    video_frames: int | None = None,
) -> dict:
    """Processor-like inputs for ``batch`` prompts of one image each (or, with ``video_frames``,
    one video of that many frames of ``image_hw``) (the same token layout in every row, so there
    is no padding; text ids and pixels differ per row), as the family's processor lays them out
    (:func:`token_prune.tiny.make_inputs`). Text ids avoid every special id and the lowest ids;
    pixels are drawn on ``device`` (default: the model's)."""
    from ..tiny import SampleSpec, make_inputs, text_pool

    cfg = model.config
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = cfg.text_config.vocab_size
    pool = text_pool(cfg, low=min(16, vocab // 4), high=32000)
    if video_frames:
        spec = SampleSpec(images=(), videos=((video_frames, *image_hw),), prefix_len=text_before,
                          suffix_len=text_after)
    else:
        spec = SampleSpec(images=(tuple(image_hw),), prefix_len=text_before, suffix_len=text_after)
    try:
        return make_inputs(model, [spec] * batch, seed=seed, device=dev, pool=pool, pixel_device=dev)
    except ValueError as e:  # an image size the family cannot take
        raise BenchError(str(e)) from None
