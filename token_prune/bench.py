"""End-to-end benchmark of token_prune's methods on full-size vision-language architectures.

    token-prune bench --preset issue6                  # Qwen2.5-VL-7B, 4096 visual tokens (GPU)
    token-prune bench --model llava_1_5_7b --setting none --setting fastv:layer=2 --keep-ratios 0.11,0.5
    token-prune bench --tiny                           # tiny models on the CPU, in seconds
    token-prune bench --preset issue6 --cost-only      # the analytic cost model alone, no model built
    python -m token_prune.bench ...                    # the same

What it does
------------
1. Builds the architecture from a config shipped in ``token_prune/configs/`` (``qwen2_5_vl_7b``,
   ``llava_1_5_7b``, ``llava_next_7b``, or a path to such a JSON file) with random weights,
   created directly on the GPU in bf16 (``torch.device("cuda")`` context + ``_from_config``, then
   every parameter re-initialised in place on the GPU: no CPU copy of the weights ever exists).
   ``--tiny`` uses the tiny models of :mod:`token_prune.tiny` instead (CPU, float32).
2. Builds synthetic inputs (random pixels, random text ids): Qwen2.5-VL ``pixel_values`` /
   ``image_grid_thw`` for an HxW image, LLaVA-1.5 one 336-px image, LLaVA-NeXT anyres tiles.
3. Agreement check: for every method (and layer K) in the run, the patched model with
   ``keep_ratio=1.0`` must give the unpatched model's greedy tokens; a difference aborts the run
   (exit status 3) unless it is a near-tie of the reference logits (see :func:`compare_generations`).
4. Latency: for the unpatched model and every setting, at ``--batch``:

   * ``ttft_ms``: one forward call (vision encoder, embedding merge, language model, LM head for
     the last token), from CUDA events around ``model(**inputs, logits_to_keep=1)``;
   * ``lm_prefill_ms``: the language-model part alone, from CUDA events recorded by forward
     pre/post hooks on the decoder (``model.model.language_model``) in the same runs: from the
     merged ``inputs_embeds`` (vision encoder output already scattered in) to the final norm,
     with the method's own work (glimpse/VIP, scoring, compaction, ALVTS selection) inside;
   * ``vision_ms``: hooks on the vision tower (Qwen: ``model.model.visual`` including the merger;
     LLaVA: ``vision_tower`` start to ``multi_modal_projector`` end);
   * decode: ``model.generate`` with a logits processor that records a CUDA event per step;
     ``decode_step_ms`` is the median step, ``decode_tok_s`` = batch * steps / decode time;
   * peak GPU memory (``torch.cuda.max_memory_allocated``) of the prefill runs and of the
     generate runs, total, above the model weights and above what was resident before the run;
   * visual tokens kept and the per-layer KV cache length after prefill (``handle.stats``).

   Warm-up runs first, then the median of ``--repeats`` runs; an L2-sized buffer is zeroed before
   every timed run so no run starts with a warm L2 cache.
5. Decode batch sweep (optional): for chosen settings, batch sizes by doubling (1, 2, 4, ...)
   until ``torch.cuda.OutOfMemoryError`` (caught, memory freed) or the last size; with
   ``--mem-cap-gb`` the caching allocator is capped so the search never goes above that.
6. Writes ``bench/results/bench_<model>_<tag or timestamp>.{json,md,png}``: the environment (GPU
   or "cpu", torch / CUDA / transformers versions, git sha), every setting, every measurement and
   the analytic cost model (:mod:`token_prune.costmodel`) beside it, so each measured ratio is
   read against the ratio the arithmetic predicts and against its floor.

On the CPU timers are ``time.perf_counter`` and the memory fields are null. NVTX ranges
(``bench.*`` here, ``glimpse.*`` / ``fastv.*`` / ``alvts.*`` / ``token_prune.*`` in the methods)
mark every stage for Nsight Systems and Nsight Compute: see bench/PROFILING.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources

import torch

from . import costmodel as cm
from . import hf, nvtx

SCHEMA = "token_prune.bench/1"
METHODS = ("none", "glimpse", "fastv", "alvts")


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (bad option, missing device)."""


class AgreementError(RuntimeError):
    """The patched model at keep_ratio=1.0 does not reproduce the unpatched model."""


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
    from . import tiny as tiny_mod

    family = arch["family"]
    if tiny:
        builder = {
            "qwen2_5_vl": tiny_mod.tiny_qwen2_5_vl,
            "llava": tiny_mod.tiny_llava,
            "llava_next": tiny_mod.tiny_llava_next,
        }[family]
        model = builder(attn_implementation=attn, dtype=dtype, seed=seed, device=device)
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


def _special_ids(cfg) -> set[int]:
    ids = set()
    for obj in (cfg, cfg.text_config):
        for key in (
            "image_token_id",
            "image_token_index",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            v = getattr(obj, key, None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(x) for x in v)
    return ids


def synthetic_inputs(
    model, image_hw: tuple[int, int], batch: int, text_before: int, text_after: int, seed: int = 0, device=None
) -> dict:
    """Processor-like inputs for ``batch`` prompts of one image each (the same token layout in
    every row, so there is no padding; the pixels differ per row).

    Qwen2.5-VL: ``text_before`` ids, ``<vision_start>``, the image tokens, ``<vision_end>``,
    ``text_after`` ids; ``pixel_values`` [patches, C*T*P*P], ``image_grid_thw``,
    ``mm_token_type_ids``. LLaVA(-NeXT): BOS, ``text_before`` ids, the image tokens,
    ``text_after`` ids; ``pixel_values`` [B, 3, S, S] (LLaVA-NeXT: [B, tiles, 3, S, S] plus
    ``image_sizes``). Text ids avoid every special id. Tensors are created on ``device``.
    """
    cfg = model.config
    family = cfg.model_type
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    special = _special_ids(cfg)
    vocab = cfg.text_config.vocab_size
    lo, hi = min(16, vocab // 4), min(vocab, 32000)
    pool = torch.tensor([i for i in range(lo, hi) if i not in special])
    g = torch.Generator().manual_seed(seed)
    pix_gen = torch.Generator(device=dev).manual_seed(seed + 1)

    def text(n):
        return pool[torch.randint(len(pool), (n,), generator=g)].tolist()

    h, w = image_hw
    out: dict = {}
    if family == "qwen2_5_vl":
        vc = cfg.vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        if h % unit or w % unit:
            raise BenchError(f"Qwen2.5-VL image sizes must be multiples of {unit} px, got {h}x{w}")
        gh, gw = h // vc.patch_size, w // vc.patch_size
        n = gh * gw // vc.spatial_merge_size**2
        row = text(text_before) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
        row += text(text_after)
        types = [0] * (text_before + 1) + [1] * n + [0] * (1 + text_after)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        out["mm_token_type_ids"] = torch.tensor(types, device=dev).repeat(batch, 1)
        out["pixel_values"] = torch.randn(batch * gh * gw, patch_dim, generator=pix_gen, device=dev).to(dtype)
        out["image_grid_thw"] = torch.tensor([[1, gh, gw]] * batch, device=dev)
    elif family in ("llava", "llava_next"):
        vc = cfg.vision_config
        size = vc.image_size
        bos = cfg.text_config.bos_token_id if cfg.text_config.bos_token_id is not None else 1
        if family == "llava":
            n = (size // vc.patch_size) ** 2
            out["pixel_values"] = torch.randn(batch, 3, size, size, generator=pix_gen, device=dev).to(dtype)
        else:
            from .tiny import llava_next_num_image_tokens, llava_next_tile_count

            n = llava_next_num_image_tokens(cfg, h, w)
            tiles = llava_next_tile_count(cfg, h, w)
            out["pixel_values"] = torch.randn(batch, tiles, 3, size, size, generator=pix_gen, device=dev).to(dtype)
            out["image_sizes"] = torch.tensor([[h, w]] * batch, device=dev)
        image_id = cfg.image_token_id
        row = [bos] + text(text_before) + [image_id] * n + text(text_after)
    else:
        raise BenchError(f"unsupported model_type {family!r}")
    ids = torch.tensor(row, device=dev).repeat(batch, 1)
    out["input_ids"] = ids
    out["attention_mask"] = torch.ones_like(ids)
    return out


# ======================================================================================
# Settings
# ======================================================================================


@dataclass
class Setting:
    """One configuration to measure: a method (``none`` = unpatched) and its patch options."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def keep_ratio(self) -> float:
        return 1.0 if self.method == "none" else float(self.options.get("keep_ratio", 1.0))

    @property
    def family_key(self) -> str:
        """The setting without its keep ratio: one plot series / one agreement check."""
        opts = {k: v for k, v in self.options.items() if k != "keep_ratio"}
        return _label(self.method, opts)

    @property
    def label(self) -> str:
        return _label(self.method, self.options)

    def to_dict(self) -> dict:
        return {"method": self.method, "options": dict(self.options), "label": self.label}


def _label(method: str, opts: dict) -> str:
    if method == "none":
        return "unpatched"
    parts = [method]
    rest = dict(opts)
    if "layer" in rest:
        parts.append(f"K={rest.pop('layer')}")
    if "keep_ratio" in rest:
        parts.append(f"f={rest.pop('keep_ratio'):g}")
    if rest.get("start_layer") == 0:
        rest.pop("start_layer")
    parts += [f"{k}={v}" for k, v in sorted(rest.items())]
    return " ".join(parts)


def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_setting(spec: str) -> tuple[str, dict]:
    """``"glimpse:layer=18,keep_ratio=0.074"`` -> ``("glimpse", {"layer": 18, "keep_ratio": 0.074})``.
    ``none`` (or ``unpatched``) is the unpatched model."""
    method, _, rest = spec.strip().partition(":")
    method = method.strip().lower()
    if method == "unpatched":
        method = "none"
    if method not in METHODS:
        raise BenchError(f"setting {spec!r}: method must be one of {', '.join(METHODS)}")
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise BenchError(f"setting {spec!r}: expected key=value, got {item!r}")
        opts[key.strip()] = _value(val.strip())
    if method == "none" and opts:
        raise BenchError(f"setting {spec!r}: the unpatched model takes no options")
    return method, opts


def default_options(method: str, family: str, num_layers: int) -> dict:
    """Options the benchmark fills in when a setting leaves them out (the methods' own defaults,
    made explicit so every result names its K)."""
    if method == "glimpse":
        from .models import ADAPTERS

        cls = ADAPTERS[family]
        K = cls.glimpse_layers.get(
            num_layers, min(num_layers - 1, max(0, round(cls.glimpse_relative_depth * num_layers)))
        )
        return {"layer": K}
    if method == "fastv":
        return {"layer": 2}
    if method == "alvts":
        return {"start_layer": 0}
    return {}


def expand_settings(
    specs: list[str], keep_ratios, family: str, num_layers: int, baseline: bool = True
) -> list[Setting]:
    """Parse ``specs``; a method setting without ``keep_ratio`` (nor ``threshold``) becomes one
    setting per keep ratio (``keep_ratios``: a list, or a dict method -> list). The unpatched
    setting comes first, duplicates are dropped."""
    out: list[Setting] = []
    seen = set()
    for spec in specs:
        method, opts = parse_setting(spec)
        full = {**default_options(method, family, num_layers), **opts}
        if method != "none" and "keep_ratio" not in full and "threshold" not in full:
            ratios = keep_ratios.get(method, []) if isinstance(keep_ratios, dict) else keep_ratios
            if not ratios:
                raise BenchError(f"setting {spec!r} has no keep_ratio and no --keep-ratios apply")
            variants = [{**full, "keep_ratio": float(f)} for f in ratios]
        else:
            variants = [full]
        for o in variants:
            s = Setting(method, o)
            if s.label not in seen:
                seen.add(s.label)
                out.append(s)
    out.sort(key=lambda s: s.method != "none")
    if baseline and not any(s.method == "none" for s in out):
        out.insert(0, Setting("none"))
    return out


# ======================================================================================
# Timing machinery
# ======================================================================================


class Clock:
    """CUDA events on a GPU (stream-ordered, no host sync when marking), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3


class L2Flush:
    """Zeroes a buffer twice the size of the GPU's L2 cache before each timed run."""

    def __init__(self, device: torch.device):
        self.buf = None
        if device.type == "cuda":
            l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
            n = max(2 * l2, 64 << 20)
            self.buf = torch.empty(n // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


class StageHooks:
    """Forward hooks that timestamp the vision tower and the language model on every call and
    open NVTX ranges around them (``bench.vision_encoder``, ``bench.language_model``)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        inner = model.model
        if hasattr(inner, "visual"):
            first = last = inner.visual
        else:
            first, last = inner.vision_tower, inner.multi_modal_projector
        self.lm = inner.language_model
        self.vision: list = []
        self.lm_calls: list = []  # (tokens in the call, start, end)
        self._open: list = []
        self._handles = [
            first.register_forward_pre_hook(self._vision_pre),
            last.register_forward_hook(self._vision_post),
            self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            self.lm.register_forward_hook(self._lm_post),
        ]

    def begin(self) -> None:
        self.vision.clear()
        self.lm_calls.clear()

    def _vision_pre(self, module, args):
        self._open.append(nvtx.push("bench.vision_encoder"))
        self.vision.append([self.clock.mark(), None])

    def _vision_post(self, module, args, output):
        if self.vision and self.vision[-1][1] is None:
            self.vision[-1][1] = self.clock.mark()
        if self._open:
            nvtx.pop(self._open.pop())

    def _lm_pre(self, module, args, kwargs):
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids", args[0] if args else None)
        q = int(ref.shape[1]) if ref is not None else 0
        self._open.append(nvtx.push("bench.language_model"))
        self.lm_calls.append([q, self.clock.mark(), None])

    def _lm_post(self, module, args, output):
        if self.lm_calls and self.lm_calls[-1][2] is None:
            self.lm_calls[-1][2] = self.clock.mark()
        if self._open:
            nvtx.pop(self._open.pop())

    def close_open_ranges(self) -> None:
        """After an exception between a pre and a post hook: pop what is still open."""
        while self._open:
            nvtx.pop(self._open.pop())

    def vision_ms(self) -> float | None:
        done = [(a, b) for a, b in self.vision if b is not None]
        return sum(self.clock.ms(a, b) for a, b in done) if done else None

    def prefill_ms(self) -> float | None:
        """The first language-model call with more than one token (the prefill)."""
        for q, a, b in self.lm_calls:
            if q > 1 and b is not None:
                return self.clock.ms(a, b)
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _step_marker_class():
    from transformers import LogitsProcessor

    class StepMarker(LogitsProcessor):
        """Timestamps every generation step (called once per step, after its forward) and keeps
        an NVTX range open over each step: ``bench.prefill`` then ``bench.decode_step``."""

        def __init__(self, clock: Clock, steps: int):
            self.clock = clock
            self.steps = steps
            self.marks: list = []
            self.opened = nvtx.push("bench.prefill")

        def __call__(self, input_ids, scores):
            self.marks.append(self.clock.mark())
            nvtx.pop(self.opened)
            self.opened = nvtx.push("bench.decode_step") if len(self.marks) < self.steps else False
            return scores

        def close(self) -> None:
            nvtx.pop(self.opened)
            self.opened = False

    return StepMarker


def _nvtx_name(label: str) -> str:
    """A setting label as an NVTX range name: no spaces, '=', brackets, '/' or '@' (Nsight Compute's
    NVTX filter expressions give those a meaning)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("=", ""))


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _summary(xs) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {
        "median": float(statistics.median(xs)),
        "min": float(min(xs)),
        "max": float(max(xs)),
        "runs": [round(float(x), 4) for x in xs],
    }


# ======================================================================================
# Agreement check
# ======================================================================================


def compare_generations(ref_tokens, ref_scores, out_tokens, out_scores, rtol: float) -> dict:
    """Compare a patched greedy generation with the unpatched one.

    Args:
        ref_tokens, out_tokens: [B, T] generated ids; ref_scores, out_scores: [B, T, V] logits.
        rtol: relative tolerance: on the first step's logits (max abs difference over the max
            abs reference logit) and for calling a token difference a near-tie.

    Returns ``{"status", "logit_rel_err", "first_diff_step", ...}``. ``status`` is ``exact``
    (same tokens, logits within rtol), ``near_tie`` (same logits within rtol and same tokens up
    to a step where the patched token's reference logit is within ``rtol * max|logit|`` of the
    reference maximum: both models agree that the two tokens tie, only rounding picked
    differently; later steps continue from different prefixes and are not compared) or
    ``mismatch``.
    """
    ref_scores = ref_scores.float()
    out_scores = out_scores.float()
    B, T = ref_tokens.shape
    first = (out_scores[:, 0] - ref_scores[:, 0]).abs().amax() / ref_scores[:, 0].abs().amax().clamp(min=1e-30)
    info = {"logit_rel_err": float(first), "rtol": rtol, "first_diff_step": None, "near_tie_margin": None}
    status = "exact"
    for b in range(B):
        diff = (ref_tokens[b] != out_tokens[b]).nonzero()
        if diff.numel() == 0:
            continue
        t = int(diff[0])
        row = ref_scores[b, t]
        margin = float(row.max() - row[out_tokens[b, t]])
        tol = rtol * float(row.abs().max())
        info["first_diff_step"] = t if info["first_diff_step"] is None else min(info["first_diff_step"], t)
        info["near_tie_margin"] = margin
        if margin <= tol:
            status = "near_tie" if status == "exact" else status
        else:
            status = "mismatch"
    if float(first) > rtol:
        status = "mismatch"
    info["status"] = status
    return info


# ======================================================================================
# The benchmark
# ======================================================================================


class Bench:
    def __init__(self, model, arch: dict, opts: dict, log=print):
        from .models import adapter_for

        self.model = model
        self.arch = arch
        self.o = opts
        self.log = log
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype
        self.cuda = self.device.type == "cuda"
        self.clock = Clock(self.device)
        self.flush = L2Flush(self.device)
        self.hooks = StageHooks(model, self.clock)
        self.adapter = adapter_for(model)
        self.family = model.config.model_type
        self.cost_arch = cm.arch_from_config(model.config, dtype_bytes=p.element_size())
        self.image = tuple(opts["image"])
        self.layout = cm.prompt_layout(model.config, self.image, opts["text_before"], opts["text_after"])
        self.weights_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        self._inputs: dict = {}
        self._selectors: dict = {}
        self.gpu = torch.cuda.get_device_name(self.device) if self.cuda else None

    # -- helpers -----------------------------------------------------------------------
    def inputs(self, batch: int, cache: bool = True) -> dict:
        if batch in self._inputs:
            return self._inputs[batch]
        x = synthetic_inputs(
            self.model, self.image, batch, self.o["text_before"], self.o["text_after"], seed=self.o["seed"]
        )
        if cache:
            self._inputs = {batch: x}
        return x

    def _random_selector(self, rank: int, start: int):
        key = (rank, start)
        if key not in self._selectors:
            from .methods.alvts import LowRankSelector

            a = self.adapter
            g = torch.Generator(device=self.device).manual_seed(self.o["seed"] + 7)
            H, d = a.hidden_size, a.head_dim

            def rnd(*shape, std):
                return (
                    torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32).mul_(std).to(self.dtype)
                )

            factors = {
                l: {
                    "q_a": rnd(rank, H, std=H**-0.5),
                    "q_b": rnd(a.num_heads * d, rank, std=rank**-0.5),
                    "k_a": rnd(rank, H, std=H**-0.5),
                    "k_b": rnd(a.num_kv_heads * d, rank, std=rank**-0.5),
                }
                for l in range(start, a.num_layers)
            }
            self._selectors = {key: LowRankSelector(factors, rank)}
            del factors
        return self._selectors[key]

    def patch_options(self, setting: Setting) -> dict:
        opts = dict(setting.options)
        if setting.method == "alvts" and self.o["alvts_selector"] == "random" and "selector" not in opts:
            rank = opts.get("rank") or self.adapter.default_alvts_rank()
            opts["rank"] = rank
            opts["selector"] = self._random_selector(rank, opts.get("start_layer", 0))
        return opts

    @contextlib.contextmanager
    def patched(self, setting: Setting):
        if setting.method == "none":
            yield None
            return
        import token_prune as tp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-VIP warning: weights are random anyway
            handle = tp.patch(self.model, method=setting.method, **self.patch_options(setting))
        try:
            yield handle
        finally:
            rt = getattr(handle, "_runtime", None)
            if rt is not None and hasattr(rt, "vision_captures"):
                rt.vision_captures.clear()
            handle.remove()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def mem(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def estimate(self, setting: Setting, batch: int, kept: int | None = None, decode_tokens: int | None = None) -> dict:
        o = setting.options
        return cm.estimate(
            self.cost_arch,
            self.layout,
            self.image,
            setting.method,
            keep_ratio=setting.keep_ratio,
            K=o.get("layer"),
            start_layer=o.get("start_layer", 0),
            skipped=o.get("skipped", "context"),
            batch=batch,
            decode_tokens=decode_tokens or self.o["decode_tokens"],
            kept=kept,
            gpu=self.gpu,
        )

    # -- runs ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward_once(self, inputs: dict) -> None:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1)
        del out

    @torch.no_grad()
    def generate(self, inputs: dict, new_tokens: int, **kw):
        return self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kw)

    @torch.no_grad()
    def generate_timed(self, inputs: dict, decode_steps: int, warm_steps: int = 0) -> dict:
        """One ``generate`` of ``1 + warm_steps + decode_steps`` tokens with a timestamp per step."""
        from transformers import LogitsProcessorList

        total = 1 + warm_steps + decode_steps
        marker = _step_marker_class()(self.clock, total)
        batch = inputs["input_ids"].shape[0]
        self.hooks.begin()
        with nvtx.range("bench.generate"):
            t0 = self.clock.mark()
            try:
                self.generate(inputs, total, logits_processor=LogitsProcessorList([marker]))
            finally:
                marker.close()
                self.hooks.close_open_ranges()
            t1 = self.clock.mark()
        self.clock.sync()
        marks = marker.marks
        if len(marks) != total:
            raise BenchError(f"generate made {len(marks)} steps, expected {total}")
        steps = [self.clock.ms(marks[i - 1], marks[i]) for i in range(1 + warm_steps, total)]
        decode_ms = sum(steps)
        return {
            "prefill_ms": self.clock.ms(t0, marks[0]),
            "step_ms": steps,
            "decode_step_ms": _median(steps),
            "decode_tok_s": batch * len(steps) / (decode_ms / 1e3) if decode_ms > 0 else None,
            "total_ms": self.clock.ms(t0, t1),
            "lm_prefill_ms": self.hooks.prefill_ms(),
            "vision_ms": self.hooks.vision_ms(),
        }

    # -- phase 1: agreement ------------------------------------------------------------------
    def check(self, settings: list[Setting]) -> list[dict]:
        """Each method family at keep_ratio=1.0 against the unpatched model (greedy tokens)."""
        batch = self.o["check_batch"]
        n = self.o["check_tokens"]
        rtol = self.o["check_rtol"]
        inputs = self.inputs(batch, cache=False)
        P = inputs["input_ids"].shape[1]
        kw = dict(output_scores=True, return_dict_in_generate=True)
        ref = self.generate(inputs, n, **kw)
        ref_tokens, ref_scores = ref.sequences[:, P:], torch.stack(ref.scores, 1)
        del ref
        results, seen = [], set()
        for s in settings:
            if s.method == "none" or s.family_key in seen:
                continue
            seen.add(s.family_key)
            full = Setting(
                s.method,
                {**{k: v for k, v in s.options.items() if k not in ("threshold", "max_keep_ratio")}, "keep_ratio": 1.0},
            )
            with nvtx.range("bench.check"), self.patched(full) as handle:
                out = self.generate(inputs, n, **kw)
                stats = handle.stats
            info = compare_generations(ref_tokens, ref_scores, out.sequences[:, P:], torch.stack(out.scores, 1), rtol)
            kept = [st.get("kept_tokens") for st in stats]
            info.update(
                setting=full.label,
                method=s.method,
                options=full.options,
                batch=batch,
                tokens=n,
                ref_tokens=ref_tokens.tolist(),
                patched_tokens=out.sequences[:, P:].tolist(),
                kept_tokens=kept,
            )
            results.append(info)
            self.log(f"  check {full.label:<28} {info['status']:<9} logit rel err {info['logit_rel_err']:.2e}")
            del out
        del ref_scores
        self.free()
        return results

    # -- phase 2: latency --------------------------------------------------------------------
    def measure(self, setting: Setting) -> dict:
        o = self.o
        batch = o["batch"]
        inputs = self.inputs(batch)
        res: dict = {
            "setting": setting.label,
            "method": setting.method,
            "options": dict(setting.options),
            "series": setting.family_key,
            "keep_ratio": setting.keep_ratio,
            "batch": batch,
        }
        with nvtx.range(f"bench.setting.{_nvtx_name(setting.label)}"), self.patched(setting) as handle:
            for _ in range(o["warmup"]):
                self.hooks.begin()
                self.forward_once(inputs)
            self.clock.sync()
            resident = self.mem()
            self.reset_peak()
            ttft, lm, vis = [], [], []
            for _ in range(o["repeats"]):
                self.flush()
                self.hooks.begin()
                with nvtx.range("bench.ttft"):
                    t0 = self.clock.mark()
                    try:
                        self.forward_once(inputs)
                    finally:
                        self.hooks.close_open_ranges()
                    t1 = self.clock.mark()
                self.clock.sync()
                ttft.append(self.clock.ms(t0, t1))
                lm.append(self.hooks.prefill_ms())
                vis.append(self.hooks.vision_ms())
            peak_prefill = self.peak()
            stats = copy.deepcopy(handle.stats) if handle is not None else None
            gens = []
            self.reset_peak()
            n_gen = o["decode_warmup"] + o["decode_repeats"] if o["decode_repeats"] else 0
            for r in range(n_gen):
                self.flush()
                g = self.generate_timed(inputs, o["decode_tokens"])
                if r >= o["decode_warmup"]:
                    gens.append(g)
            peak_gen = self.peak()
        self.free()
        visual = self.layout["visual"]
        if stats:
            s0 = stats[0]
            kept = s0.get("kept_tokens")
            kv = s0.get("kv_len")
            processed = s0.get("visual_processed")
            if processed:  # ALVTS keeps every token in the residual stream; report what a layer processes
                kept = max(processed[setting.options.get("start_layer", 0) :] or processed)
        else:
            kept, kv, processed = visual, [self.layout["prompt"]] * self.cost_arch.lm.layers, None
        kept_for_model = kept if setting.method != "alvts" else None
        est = self.estimate(setting, batch, kept=kept_for_model)
        kvb = self.cost_arch.lm.kv_bytes_per_token(self.cost_arch.dtype_bytes)
        res.update(
            {
                "ttft_ms": _summary(ttft),
                "lm_prefill_ms": _summary(lm),
                "vision_ms": _summary(vis),
                "other_ms": _median([t - (l or 0) - (v or 0) for t, l, v in zip(ttft, lm, vis, strict=True)]),
                "generate_prefill_ms": _summary([g["prefill_ms"] for g in gens]),
                "decode_step_ms": _summary([g["decode_step_ms"] for g in gens]),
                "decode_tok_s": _summary([g["decode_tok_s"] for g in gens]),
                "decode_tokens": o["decode_tokens"],
                "visual_tokens": visual,
                "kept_tokens": kept,
                "visual_processed_per_layer": processed,
                "kv_len": kv,
                "kv_cache_bytes": batch * sum(kv) * kvb if kv else None,
                "memory": self._memory(resident, peak_prefill, peak_gen),
                "stats": stats,
                "cost": est,
            }
        )
        return res

    def _memory(self, resident, peak_prefill, peak_gen) -> dict:
        gb = 1 << 30
        if not self.cuda:
            return {
                "weights_gb": self.weights_bytes / gb,
                "resident_gb": None,
                "peak_prefill_gb": None,
                "peak_generate_gb": None,
                "peak_gb": None,
                "above_weights_gb": None,
                "above_resident_gb": None,
            }
        peak = max(x for x in (peak_prefill, peak_gen) if x is not None)
        return {
            "weights_gb": self.weights_bytes / gb,
            "resident_gb": resident / gb,
            "peak_prefill_gb": peak_prefill / gb,
            "peak_generate_gb": peak_gen / gb,
            "peak_gb": peak / gb,
            "above_weights_gb": (peak - self.weights_bytes) / gb,
            "above_resident_gb": (peak - resident) / gb,
        }

    # -- phase 3: batch sweep ----------------------------------------------------------------
    def sweep(self, setting: Setting, batches: list[int], max_batch: int | None) -> list[dict]:
        rows = []
        todo = list(batches)
        while todo:
            B = todo.pop(0)
            row = {
                "setting": setting.label,
                "method": setting.method,
                "options": dict(setting.options),
                "series": setting.family_key,
                "keep_ratio": setting.keep_ratio,
                "batch": B,
            }
            err = self._sweep_one(setting, B, row)
            if err is not None:
                row.update(status="oom", error=err[:300])
                rows.append(row)
                self.log(f"  sweep {setting.label:<28} B={B:<4} out of memory")
                break
            row["status"] = "ok"
            rows.append(row)
            self.log(
                f"  sweep {setting.label:<28} B={B:<4} {row['decode_tok_s']:9.1f} tok/s "
                f"{row['decode_step_ms']:8.2f} ms/step"
                + (f"  peak {row['peak_gb']:.1f} GB" if row.get("peak_gb") else "")
            )
            if not todo and max_batch and B * 2 <= max_batch:
                todo.append(B * 2)
        return rows

    def _sweep_inner(self, setting: Setting, B: int):
        o = self.o
        with nvtx.range(f"bench.sweep.{_nvtx_name(setting.label)}.B{B}"), self.patched(setting) as handle:
            inputs = synthetic_inputs(self.model, self.image, B, o["text_before"], o["text_after"], seed=o["seed"])
            resident = self.mem()
            self.reset_peak()
            g = self.generate_timed(inputs, o["sweep_decode_tokens"], warm_steps=o["sweep_warm_steps"])
            stats = handle.stats if handle is not None else None
            kv = stats[0].get("kv_len") if stats else [self.layout["prompt"]] * self.cost_arch.lm.layers
            peak = self.peak()
        return g, kv, resident, peak

    def _sweep_one(self, setting: Setting, B: int, row: dict) -> str | None:
        """Fill ``row`` with one batch size's numbers; return an error string on OOM (after
        freeing everything the failed attempt allocated)."""
        failed = None
        try:
            # The work runs in its own frame: once the exception is handled nothing refers to
            # the tensors it allocated, so empty_cache() below really returns the memory.
            g, kv, resident, peak = self._sweep_inner(setting, B)
        except torch.cuda.OutOfMemoryError as e:
            failed = f"{type(e).__name__}: {e}"
        except RuntimeError as e:  # allocation failures some libraries report as plain errors
            if "out of memory" not in str(e).lower() and "ALLOC_FAILED" not in str(e):
                raise
            failed = f"{type(e).__name__}: {e}"
        finally:
            self.hooks.close_open_ranges()
        self.free()
        if failed is not None:
            return failed
        o = self.o
        est = self.estimate(setting, B, decode_tokens=o["sweep_decode_tokens"])
        gb = 1 << 30
        row.update(
            {
                "decode_tok_s": g["decode_tok_s"],
                "decode_step_ms": g["decode_step_ms"],
                "prefill_ms": g["prefill_ms"],
                "lm_prefill_ms": g["lm_prefill_ms"],
                "vision_ms": g["vision_ms"],
                "decode_tokens": o["sweep_decode_tokens"],
                "warm_steps": o["sweep_warm_steps"],
                "kv_len_layer0": kv[0] if kv else None,
                "kv_cache_bytes": B * sum(kv) * self.cost_arch.lm.kv_bytes_per_token(self.cost_arch.dtype_bytes)
                if kv
                else None,
                "peak_gb": peak / gb if peak is not None else None,
                "above_resident_gb": (peak - resident) / gb if peak is not None else None,
                "cost": {
                    "decode_step": est["decode_step"],
                    "decode_step_bytes": est["totals"]["decode_step_bytes"],
                    "roofline_ms": est.get("roofline_ms"),
                },
            }
        )
        return None

    def close(self) -> None:
        self.hooks.remove()
        self._inputs = {}
        self._selectors = {}


# ======================================================================================
# Environment
# ======================================================================================


def git_info() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha, dirty = os.environ.get("TOKEN_PRUNE_GIT_SHA"), None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            sha = out.stdout.strip()
            st = subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_sha": sha or "unknown", "git_dirty": dirty}


def environment(device: torch.device | None) -> dict:
    import transformers

    from . import __version__, _ops

    env = {
        "device": device.type if device is not None else "none",
        "gpu": "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "token_prune": __version__,
        "extension_loaded": _ops.EXTENSION_LOADED,
        "extension_with_cuda": _ops.EXTENSION_WITH_CUDA,
        "nvtx": nvtx.enabled(),
        "cpu_threads": torch.get_num_threads(),
        **git_info(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gb=props.total_memory / (1 << 30),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    return env


# ======================================================================================
# Reports
# ======================================================================================


def _fmt(x, spec=".1f", none="–"):
    if x is None:
        return none
    if isinstance(x, dict):
        x = x.get("median")
        if x is None:
            return none
    return format(x, spec)


def _ratio(a, b):
    a = a.get("median") if isinstance(a, dict) else a
    b = b.get("median") if isinstance(b, dict) else b
    if a is None or b is None or b == 0:
        return None
    return a / b


def with_ratios(results: dict) -> dict:
    """Add measured and modelled ratios against the unpatched row to every latency row."""
    rows = results.get("latency", [])
    base = next((r for r in rows if r["method"] == "none"), None)
    if base is None:
        return results
    for r in rows:
        est, best = r.get("cost"), base.get("cost")
        model = cm.ratios(est, best) if est and best else {}
        r["ratios"] = {
            "lm_prefill": _ratio(r.get("lm_prefill_ms"), base.get("lm_prefill_ms")),
            "ttft": _ratio(r.get("ttft_ms"), base.get("ttft_ms")),
            "decode_step": _ratio(r.get("decode_step_ms"), base.get("decode_step_ms")),
            "peak_memory": _ratio((r.get("memory") or {}).get("peak_gb"), (base.get("memory") or {}).get("peak_gb")),
            "model_lm_prefill_flops": model.get("lm_prefill_flops"),
            "model_ttft_flops": model.get("ttft_flops"),
            "model_decode_step_bytes": model.get("decode_step_bytes"),
            "model_kv_cache_bytes": model.get("kv_cache_bytes"),
            "floor": model.get("floor"),
        }
    return results


def markdown(results: dict) -> str:
    env, st, m = results["env"], results["settings"], results.get("model", {})
    L = []
    title = m.get("title", st.get("model"))
    L.append(f"# token_prune benchmark: {title}")
    L.append("")
    L.append(f"- created {results.get('created')}, tag `{results.get('tag')}`")
    L.append(
        f"- device: **{env.get('gpu')}**"
        + (f" ({env.get('gpu_memory_gb', 0):.0f} GiB)" if env.get("gpu_memory_gb") else "")
        + f"; torch {env.get('torch')}, CUDA {env.get('cuda')}, transformers {env.get('transformers')}, "
        f"python {env.get('python')}; token_prune {env.get('token_prune')} @ `{str(env.get('git_sha'))[:12]}`"
        + (" (dirty)" if env.get("git_dirty") else "")
        + f"; compiled extension: {env.get('extension_loaded')}"
    )
    if m:
        L.append(
            f"- model: {m.get('name')} ({_params(m.get('params'))} params, random weights, {st.get('dtype')}, "
            f"attention `{st.get('attn')}`); prompt: {m.get('text_tokens')} text + {m.get('visual_tokens')} visual "
            f"= {m.get('prompt_tokens')} tokens, image {st.get('image')[0]}x{st.get('image')[1]}"
        )
    L.append(
        f"- timing: {'CUDA events' if env.get('device') == 'cuda' else 'time.perf_counter (CPU)'}, "
        f"{st.get('warmup')} warm-up + median of {st.get('repeats')} runs (decode: {st.get('decode_warmup')} + "
        f"{st.get('decode_repeats')} generate runs of {st.get('decode_tokens')} steps), L2 flushed before each run; "
        f"batch {st.get('batch')}"
    )
    L.append("")
    checks = results.get("check") or []
    if checks:
        L.append("## Agreement check (keep_ratio = 1.0 vs unpatched, greedy)")
        L.append("")
        L.append("| setting | status | first-step logit rel. err | first differing step | steps x batch |")
        L.append("|---|---|---|---|---|")
        for c in checks:
            L.append(
                f"| {c['setting']} | {c['status']} | {c['logit_rel_err']:.2e} | {_fmt(c.get('first_diff_step'), 'd')} "
                f"| {len(c['ref_tokens'][0])} x {len(c['ref_tokens'])} |"
            )
        L.append("")
    rows = results.get("latency") or []
    if rows:
        L.append(f"## Latency and memory (batch {st.get('batch')})")
        L.append("")
        L.append(
            "Ratios are against the unpatched row; *model* is the cost model's FLOPs (prefill) or bytes "
            "(decode) ratio, *floor* is `(K+1 + (L-K-1) f) / L` (ALVTS: f)."
        )
        L.append("")
        L.append(
            "| setting | kept / visual | KV len (layer 0 / last) | vision ms | LM prefill ms | LM ratio | model "
            "| floor | TTFT ms | TTFT ratio | model | decode ms/step | tok/s | decode ratio | model | peak GiB "
            "| above weights GiB |"
        )
        L.append("|" + "---|" * 17)
        for r in rows:
            q = r.get("ratios", {})
            kv = r.get("kv_len") or []
            mem = r.get("memory") or {}
            L.append(
                f"| {r['setting']} | {r.get('kept_tokens')} / {r.get('visual_tokens')} | "
                f"{kv[0] if kv else '–'} / {kv[-1] if kv else '–'} | {_fmt(r.get('vision_ms'), '.2f')} | "
                f"{_fmt(r.get('lm_prefill_ms'), '.2f')} | {_fmt(q.get('lm_prefill'), '.3f')} | "
                f"{_fmt(q.get('model_lm_prefill_flops'), '.3f')} | {_fmt(q.get('floor'), '.3f')} | "
                f"{_fmt(r.get('ttft_ms'), '.2f')} | {_fmt(q.get('ttft'), '.3f')} | "
                f"{_fmt(q.get('model_ttft_flops'), '.3f')} | "
                f"{_fmt(r.get('decode_step_ms'), '.2f')} | {_fmt(r.get('decode_tok_s'), '.1f')} | "
                f"{_fmt(q.get('decode_step'), '.3f')} | {_fmt(q.get('model_decode_step_bytes'), '.3f')} | "
                f"{_fmt(mem.get('peak_gb'), '.2f')} | {_fmt(mem.get('above_weights_gb'), '.2f')} |"
            )
        L.append("")
        L.append("### Cost model per setting")
        L.append("")
        L.append(
            "| setting | vision GFLOP | LM prefill GFLOP | of which attention | method's own GFLOP "
            "| LM prefill GB moved | decode step GB read | KV cache MiB | roofline LM ms | roofline decode ms |"
        )
        L.append("|" + "---|" * 10)
        for r in rows:
            c = r.get("cost") or {}
            t = c.get("totals", {})
            own = sum(v["flops"] for k, v in c.get("lm_prefill", {}).items() if k in ("vip", "score", "select"))
            roof = c.get("roofline_ms") or {}
            L.append(
                f"| {r['setting']} | {t.get('vision_flops', 0) / 1e9:.1f} | {t.get('lm_prefill_flops', 0) / 1e9:.1f} | "
                f"{t.get('lm_prefill_attn_flops', 0) / 1e9:.1f} | {own / 1e9:.2f} | "
                f"{t.get('lm_prefill_bytes', 0) / 1e9:.2f} | "
                f"{t.get('decode_step_bytes', 0) / 1e9:.3f} | {c.get('kv_cache_bytes', 0) / (1 << 20):.1f} | "
                f"{_fmt(roof.get('lm_prefill'), '.2f')} | {_fmt(roof.get('decode_step'), '.3f')} |"
            )
        L.append("")
    sweep = results.get("sweep") or []
    if sweep:
        L.append("## Decode batch sweep")
        L.append("")
        cap = f"memory capped at {st['mem_cap_gb']} GB" if st.get("mem_cap_gb") else "no memory cap"
        L.append(
            f"Each row: one `generate` of 1 + {st.get('sweep_warm_steps')} warm-up + "
            f"{st.get('sweep_decode_tokens')} timed "
            f"steps; batch sizes doubled until the first out-of-memory error; {cap}."
        )
        L.append("")
        L.append(
            "| setting | batch | status | tok/s | ms/step | prefill ms | peak GiB | KV cache MiB "
            "| model decode GB/step | roofline ms/step |"
        )
        L.append("|" + "---|" * 10)
        for r in sweep:
            c = r.get("cost") or {}
            L.append(
                f"| {r['setting']} | {r['batch']} | {r['status']} | {_fmt(r.get('decode_tok_s'), '.1f')} | "
                f"{_fmt(r.get('decode_step_ms'), '.2f')} | {_fmt(r.get('prefill_ms'), '.1f')} | "
                f"{_fmt(r.get('peak_gb'), '.2f')} | "
                f"{_fmt(_mib(r.get('kv_cache_bytes')), '.1f')} | "
                f"{_fmt(c.get('decode_step_bytes', 0) / 1e9 if c.get('decode_step_bytes') else None, '.3f')} | "
                f"{_fmt((c.get('roofline_ms') or {}).get('decode_step'), '.3f')} |"
            )
        L.append("")
        largest = results.get("largest_batch") or {}
        if largest:
            L.append("Largest batch that ran: " + ", ".join(f"{k}: {v}" for k, v in largest.items()))
            L.append("")
    notes = results.get("notes") or []
    if notes:
        L.append("## Notes")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    return "\n".join(L)


def plot(results: dict, path: str) -> str | None:
    """Latency and memory against the keep ratio per method, decode throughput against batch.
    Returns None when matplotlib is missing (re-render later with ``--report-from``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    rows = results.get("latency") or []
    sweep = results.get("sweep") or []
    base = next((r for r in rows if r["method"] == "none"), None)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    series: dict[str, list] = {}
    for r in rows:
        if r["method"] != "none":
            series.setdefault(r["series"], []).append(r)
    panels = [
        (axes[0][0], "LM prefill (ms)", lambda r: _median_of(r.get("lm_prefill_ms")), True),
        (axes[0][1], "time to first token (ms)", lambda r: _median_of(r.get("ttft_ms")), False),
        (
            axes[1][0],
            "peak GPU memory above weights (GiB)",
            lambda r: (r.get("memory") or {}).get("above_weights_gb"),
            False,
        ),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name, get, with_model in panels:
        any_data = False
        for i, (key, rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["keep_ratio"])
            xs = [r["keep_ratio"] for r in rs]
            ys = [get(r) for r in rs]
            if all(y is None for y in ys):
                continue
            any_data = True
            col = colors[i % len(colors)]
            ax.plot(xs, ys, "o-", color=col, label=key)
            if with_model and base is not None and get(base):
                model = [
                    get(base) * ((r.get("ratios") or {}).get("model_lm_prefill_flops") or float("nan")) for r in rs
                ]
                ax.plot(xs, model, ":", color=col, alpha=0.7)
        if base is not None and get(base) is not None:
            ax.axhline(get(base), color="k", ls="--", lw=1, label="unpatched")
            any_data = True
        ax.set_xlabel("keep ratio f")
        ax.set_title(name + (" (dotted: cost model)" if with_model else ""))
        ax.grid(alpha=0.3)
        if any_data:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data (CPU run: no GPU memory)", ha="center", va="center", transform=ax.transAxes)
    ax = axes[1][1]
    by: dict[str, list] = {}
    for r in sweep:
        if r.get("status") == "ok":
            by.setdefault(r["setting"], []).append(r)
    for i, (key, rs) in enumerate(sorted(by.items())):
        rs = sorted(rs, key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in rs], [r["decode_tok_s"] for r in rs], "o-", label=key, color=colors[i % len(colors)]
        )
    if by:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no batch sweep in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("batch")
    ax.set_title("decode throughput (tokens/s)")
    ax.grid(alpha=0.3)
    env, st = results["env"], results["settings"]
    fig.suptitle(
        f"{(results.get('model') or {}).get('title', st.get('model'))} on {env.get('gpu')}, batch {st.get('batch')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _params(n) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _mib(n):
    return None if n is None else n / (1 << 20)


def _median_of(x):
    return x.get("median") if isinstance(x, dict) else x


def write_reports(results: dict, out_dir: str, stem: str, want_plot: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    with_ratios(results)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md")}
    if want_plot:
        png = os.path.join(out_dir, stem + ".png")
        why = plot(results, png)
        if why is None:
            paths["png"] = png
        else:
            results.setdefault("notes", []).append(
                f"no plot: {why} (re-render with `token-prune bench --report-from {paths['json']}` where it is)"
            )
    results["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    os.replace(tmp, paths["json"])
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    return paths


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ======================================================================================
# Presets and options
# ======================================================================================

DEFAULTS = dict(
    model="qwen2_5_vl_7b",
    dtype="bfloat16",
    attn="sdpa",
    batch=1,
    decode_tokens=32,
    warmup=2,
    repeats=5,
    decode_warmup=1,
    decode_repeats=3,
    settings=["none", "glimpse", "fastv:layer=2", "alvts"],
    keep_ratios=[0.11, 0.25, 0.5, 1.0],
    sweep=False,
    sweep_batches=[1, 2, 4, 8, 16, 32, 64],
    sweep_settings=None,
    sweep_max_batch=None,
    sweep_decode_tokens=16,
    sweep_warm_steps=4,
    mem_cap_gb=None,
    check_tokens=8,
    check_batch=1,
    check_rtol=None,
    seed=0,
    alvts_selector="random",
    out_dir=os.path.join("bench", "results"),
)

TINY_DEFAULTS = dict(
    dtype="float32",
    decode_tokens=4,
    warmup=1,
    repeats=3,
    decode_warmup=1,
    decode_repeats=2,
    keep_ratios=[0.25, 0.5, 1.0],
    sweep=True,
    sweep_batches=[1, 2],
    sweep_decode_tokens=4,
    sweep_warm_steps=1,
    check_tokens=6,
    check_batch=2,
)

TINY_IMAGES = {"qwen2_5_vl": (128, 128), "llava": (56, 56), "llava_next": (112, 112)}

PRESETS = {
    # GitHub issue 6: Qwen2.5-VL-7B, one 1792x1792 image (64x64 = 4096 merged visual tokens).
    "issue6": dict(
        model="qwen2_5_vl_7b",
        image=(1792, 1792),
        dtype="bfloat16",
        attn="sdpa",
        settings=["none", "glimpse:layer=18", "glimpse:layer=2,keep_ratio=0.074", "fastv:layer=2", "alvts",
                  "alvts:keep_ratio=0.11,skipped=drop"],
        keep_ratios={
            "glimpse": [0.074, 0.25, 0.5, 1.0],
            "fastv": [0.074, 0.25, 0.5, 1.0],
            "alvts": [0.11, 0.25, 0.5, 1.0],
        },
        batch=1,
        decode_tokens=32,
        warmup=2,
        repeats=5,
        decode_warmup=1,
        decode_repeats=3,
        sweep=True,
        sweep_batches=[1, 2, 4, 8, 16, 32, 64],
        sweep_max_batch=64,
        sweep_settings=[
            "none",
            "glimpse:layer=18,keep_ratio=0.074",
            "fastv:layer=2,keep_ratio=0.074",
            # decode on the "context" reading's full caches is the unpatched model's; "drop" prunes them
            "alvts:keep_ratio=0.11,skipped=drop",
        ],
        sweep_decode_tokens=16,
        sweep_warm_steps=4,
        mem_cap_gb=70.0,
        check_tokens=8,
        check_batch=1,
    ),
}
PRESETS["qwen2_5_vl_7b_4k"] = PRESETS["issue6"]  # the preset's name after the package restructuring


def _csv(conv):
    def parse(text):
        try:
            return [conv(x) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _hw(text):
    a, sep, b = text.lower().partition("x")
    try:
        return (int(a), int(b if sep else a))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` options (shared by ``token-prune bench`` and ``python -m token_prune.bench``).
    Options left unset take the preset's value, then the defaults (``--tiny`` has its own)."""
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named configuration (issue6: the GitHub issue 6 targets)"
    )
    g.add_argument(
        "--model",
        help=f"architecture config: one of {', '.join(list_archs())}, or a JSON path (default {DEFAULTS['model']})",
    )
    g.add_argument("--tiny", action="store_true", help="use the tiny random models of token_prune.tiny (CPU, seconds)")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"])
    g.add_argument(
        "--image", type=_hw, help="image size HxW in pixels (Qwen2.5-VL: multiples of 28; LLaVA-NeXT: anyres)"
    )
    g.add_argument("--text-before", type=int, help="text tokens before the image")
    g.add_argument("--text-after", type=int, help="text tokens after the image (question + assistant prefix)")
    g.add_argument(
        "--setting",
        action="append",
        dest="settings_cli",
        metavar="METHOD[:k=v,...]",
        help="a setting to measure, repeatable: none | glimpse[:layer=K,keep_ratio=f] | fastv[:layer=K,...] | "
        "alvts[:keep_ratio=f,start_layer=s,rank=R]; without keep_ratio it is run at every --keep-ratios",
    )
    g.add_argument(
        "--keep-ratios", type=_csv(float), help="keep fractions for settings that give none (default 0.11,0.25,0.5,1.0)"
    )
    g.add_argument(
        "--only", type=_csv(str), help="phases to run, comma separated: check, latency, sweep (default: all enabled)"
    )
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--alvts-selector",
        choices=["random", "svd"],
        help="ALVTS low-rank factors: random (default; timing does not depend on their values) or svd "
        "(the method's own SVD start; minutes for a 7B model)",
    )
    t = p.add_argument_group("timing")
    t.add_argument("--batch", type=int, help="batch size of the latency runs")
    t.add_argument("--decode-tokens", type=int, help="decode steps timed per generate run")
    t.add_argument("--warmup", type=int, help="untimed prefill runs first")
    t.add_argument("--repeats", type=int, help="timed prefill runs (median reported)")
    t.add_argument("--decode-warmup", type=int)
    t.add_argument("--decode-repeats", type=int, help="timed generate runs (median reported); 0 skips decode timing")
    s = p.add_argument_group("decode batch sweep")
    s.add_argument("--sweep", action="store_true", default=None, help="run the decode batch sweep")
    s.add_argument("--no-sweep", action="store_false", dest="sweep")
    s.add_argument(
        "--sweep-batches", type=_csv(int), help="batch sizes in order (default 1,2,4,...,64); stops at the first OOM"
    )
    s.add_argument(
        "--sweep-max-batch", type=int, help="after the list, keep doubling up to this size (or the first OOM)"
    )
    s.add_argument(
        "--sweep-setting",
        action="append",
        dest="sweep_settings_cli",
        metavar="SPEC",
        help="a setting for the sweep (repeatable; default: unpatched + each method at its smallest keep ratio)",
    )
    s.add_argument("--sweep-decode-tokens", type=int)
    s.add_argument("--sweep-warm-steps", type=int, help="untimed decode steps before the timed ones")
    s.add_argument("--mem-cap-gb", type=float, help="cap the CUDA caching allocator (GB); OOM is raised above it")
    c = p.add_argument_group("agreement check")
    c.add_argument("--skip-check", action="store_true", help="do not run the keep-everything agreement check")
    c.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not add the unpatched model to the settings (profiling runs; no ratios then)",
    )
    c.add_argument("--check-tokens", type=int)
    c.add_argument("--check-batch", type=int)
    c.add_argument(
        "--check-rtol",
        type=float,
        help="logit tolerance, relative to the largest |logit| (default 1e-3 in float32, 5e-2 in bf16/fp16)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="directory for the JSON / Markdown / PNG (default bench/results)")
    o.add_argument("--tag", help="file name tag (default: a timestamp)")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument(
        "--cost-only", action="store_true", help="print and save the cost model for the settings; build no model"
    )
    o.add_argument(
        "--report-from",
        nargs="+",
        metavar="JSON",
        help="re-render Markdown + PNG from result JSON files (several: merged) and exit",
    )
    o.add_argument("--threads", type=int, help="torch CPU threads (--tiny default: 1)")
    o.add_argument("--quiet", action="store_true")


def resolve_options(args) -> dict:
    """Merge CLI values over the preset over the defaults into one plain dict."""
    o = dict(DEFAULTS)
    if args.tiny:
        o.update(TINY_DEFAULTS)
    if args.preset:
        preset = dict(PRESETS[args.preset])
        if args.tiny:  # keep the preset's settings, but the tiny model's sizes and budgets
            for key in (
                "image",
                "dtype",
                "batch",
                "decode_tokens",
                "warmup",
                "repeats",
                "decode_warmup",
                "decode_repeats",
                "sweep_batches",
                "sweep_max_batch",
                "sweep_decode_tokens",
                "sweep_warm_steps",
                "mem_cap_gb",
                "check_tokens",
                "check_batch",
            ):
                preset.pop(key, None)
            preset["settings"] = [s.replace("layer=18", "layer=4") for s in preset["settings"]]
            preset["sweep_settings"] = [s.replace("layer=18", "layer=4") for s in preset["sweep_settings"]]
        o.update(preset)
    cli = {
        "model": args.model,
        "dtype": args.dtype,
        "attn": args.attn,
        "image": args.image,
        "text_before": args.text_before,
        "text_after": args.text_after,
        "settings": args.settings_cli,
        "keep_ratios": args.keep_ratios,
        "seed": args.seed,
        "alvts_selector": args.alvts_selector,
        "batch": args.batch,
        "decode_tokens": args.decode_tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "decode_warmup": args.decode_warmup,
        "decode_repeats": args.decode_repeats,
        "sweep": args.sweep,
        "sweep_batches": args.sweep_batches,
        "sweep_max_batch": args.sweep_max_batch,
        "sweep_settings": args.sweep_settings_cli,
        "sweep_decode_tokens": args.sweep_decode_tokens,
        "sweep_warm_steps": args.sweep_warm_steps,
        "mem_cap_gb": args.mem_cap_gb,
        "check_tokens": args.check_tokens,
        "check_batch": args.check_batch,
        "check_rtol": args.check_rtol,
        "out_dir": args.out_dir,
    }
    o.update({k: v for k, v in cli.items() if v is not None})
    if args.sweep_batches is not None and args.sweep is None:
        o["sweep"] = True
    phases = args.only or ["check", "latency", "sweep"]
    bad = set(phases) - {"check", "latency", "sweep"}
    if bad:
        raise BenchError(f"--only: unknown phase(s) {', '.join(sorted(bad))}; use check, latency, sweep")
    if "sweep" in (args.only or []):
        o["sweep"] = True
    o["phases"] = [
        p
        for p in ("check", "latency", "sweep")
        if p in phases and not (p == "check" and args.skip_check) and not (p == "sweep" and not o["sweep"])
    ]
    o["tiny"] = bool(args.tiny)
    o["no_baseline"] = bool(getattr(args, "no_baseline", False))
    o["preset"] = args.preset
    o["tag"] = args.tag
    for key in ("batch", "decode_tokens", "repeats", "check_tokens", "check_batch"):
        if o[key] < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("warmup", "decode_warmup", "decode_repeats", "sweep_warm_steps"):
        if o[key] < 0:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 0")
    return o


def _log(quiet):
    def log(*a):
        if not quiet:
            print(*a, flush=True)

    return log


def _stem(o: dict, name: str) -> str:
    tag = o.get("tag") or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"bench_{name}{'_tiny' if o['tiny'] else ''}_{tag}"


# ======================================================================================
# Entry points
# ======================================================================================


def run(args) -> int:
    """Run the benchmark for parsed ``args``; returns the process exit status."""
    log = _log(args.quiet)
    if args.report_from:
        return _report_from(args, log)
    o = resolve_options(args)
    arch = load_arch(o["model"])
    name = arch["name"]
    config = hf_config(arch)
    family = arch["family"]
    if o.get("image") is None:
        o["image"] = tuple(TINY_IMAGES[family]) if o["tiny"] else tuple(arch["defaults"]["image"])
    for key in ("text_before", "text_after"):
        if o.get(key) is None:
            o[key] = (3 if key == "text_before" else 5) if o["tiny"] else int(arch["defaults"][key])
    if o.get("check_rtol") is None:
        o["check_rtol"] = 1e-3 if o["dtype"] == "float32" else 5e-2

    if args.cost_only:
        return _cost_only(o, arch, config, log)

    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
        if dev_name == "cpu" and not o["tiny"]:
            raise BenchError(
                f"{name} is a full-size model and no GPU is available: use --tiny on a CPU, --cost-only "
                "for the cost model alone, or --device cpu to build it on the CPU anyway"
            )
    device = torch.device(dev_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif o["tiny"] and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads
    if device.type == "cuda" and o.get("mem_cap_gb"):
        total = torch.cuda.get_device_properties(device).total_memory
        frac = min(1.0, o["mem_cap_gb"] * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(frac, device)
        o["mem_cap_fraction"] = frac
    dtype = getattr(torch, o["dtype"])

    t0 = time.perf_counter()
    log(f"building {name}{' (tiny)' if o['tiny'] else ''} on {device} in {o['dtype']} ...")
    model = build_model(arch, tiny=o["tiny"], device=device, dtype=dtype, attn=o["attn"], seed=o["seed"])
    build_s = time.perf_counter() - t0
    num_layers = model.config.text_config.num_hidden_layers
    settings = expand_settings(o["settings"], o["keep_ratios"], family, num_layers, baseline=not o["no_baseline"])
    sweep_specs = o.get("sweep_settings")
    if sweep_specs:
        sweep_settings = expand_settings(sweep_specs, o["keep_ratios"], family, num_layers)
    else:
        sweep_settings = [s for s in settings if s.method == "none"]
        sweep_settings += _smallest_per_series([s for s in settings if s.method != "none"])

    bench = Bench(model, arch, o, log)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"  built in {build_s:.1f}s: {_params(n_params)} params, weights {bench.weights_bytes / (1 << 30):.2f} GiB"
        + (f", allocated {torch.cuda.memory_allocated(device) / (1 << 30):.2f} GiB" if device.type == "cuda" else "")
    )
    log(
        f"  prompt: {bench.layout['text']} text + {bench.layout['visual']} visual tokens, "
        f"image {o['image'][0]}x{o['image'][1]}"
    )
    settings_out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()}
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "tag": o.get("tag"),
        "env": environment(device),
        "settings": settings_out,
        "setting_list": [s.to_dict() for s in settings],
        "sweep_setting_list": [s.to_dict() for s in sweep_settings],
        "model": {
            "name": name,
            "title": arch.get("title", name) + (" (tiny twin)" if o["tiny"] else ""),
            "family": family,
            "params": n_params,
            "weights_bytes": bench.weights_bytes,
            "build_s": build_s,
            "text_tokens": bench.layout["text"],
            "visual_tokens": bench.layout["visual"],
            "prompt_tokens": bench.layout["prompt"],
            "layers": num_layers,
            "arch": bench.cost_arch.to_dict(),
        },
        "check": [],
        "latency": [],
        "sweep": [],
        "largest_batch": {},
        "notes": [],
    }
    if o["tiny"]:
        results["notes"].append(
            "tiny model on the CPU: checks that the tool works end to end; the numbers mean nothing"
        )
    results["notes"].append(
        "random weights: GlimpsePrune uses a random VIP and ALVTS a "
        f"{o['alvts_selector']} selector, so which tokens are kept is arbitrary; how many is fixed by "
        "keep_ratio, which is all the timing depends on"
    )
    stem = _stem(o, name)
    out_dir = o["out_dir"]

    def save(final=False):
        return write_reports(results, out_dir, stem, want_plot=final and not args.no_plot)

    status = 0
    try:
        if "check" in o["phases"]:
            log("agreement check (keep_ratio=1.0 vs unpatched):")
            results["check"] = bench.check(settings)
            bad = [c for c in results["check"] if c["status"] == "mismatch"]
            if bad:
                save(final=False)
                lines = "; ".join(
                    f"{c['setting']}: logit rel err {c['logit_rel_err']:.3g}, first differing step "
                    f"{c['first_diff_step']}"
                    for c in bad
                )
                raise AgreementError(
                    f"the patched model with keep_ratio=1.0 does not reproduce the unpatched model "
                    f"({lines}). Timing a model that computes something else is meaningless: aborted. "
                    f"Details in {os.path.join(out_dir, stem + '.json')}"
                )
        if "latency" in o["phases"]:
            log(
                f"latency (batch {o['batch']}, {o['warmup']} warm-up + {o['repeats']} runs, "
                f"{o['decode_tokens']} decode steps):"
            )
            for s in settings:
                r = bench.measure(s)
                results["latency"].append(r)
                with_ratios(results)
                q = r.get("ratios", {})
                log(
                    f"  {s.label:<28} LM {_fmt(r['lm_prefill_ms'], '9.2f')} ms (x{_fmt(q.get('lm_prefill'), '.3f')}, "
                    f"model x{_fmt(q.get('model_lm_prefill_flops'), '.3f')}, floor {_fmt(q.get('floor'), '.3f')})  "
                    f"TTFT {_fmt(r['ttft_ms'], '9.2f')} ms  decode {_fmt(r['decode_tok_s'], '8.1f')} tok/s"
                    + (f"  peak {r['memory']['peak_gb']:.2f} GiB" if r["memory"].get("peak_gb") is not None else "")
                )
                save()
        if "sweep" in o["phases"]:
            log(
                f"decode batch sweep {o['sweep_batches']}"
                + (f" (up to {o['sweep_max_batch']})" if o.get("sweep_max_batch") else "")
                + (f", memory cap {o['mem_cap_gb']} GB" if o.get("mem_cap_gb") else "")
                + ":"
            )
            for s in sweep_settings:
                rows = bench.sweep(s, o["sweep_batches"], o.get("sweep_max_batch"))
                results["sweep"].extend(rows)
                ok = [r["batch"] for r in rows if r["status"] == "ok"]
                results["largest_batch"][s.label] = max(ok) if ok else 0
                save()
    except AgreementError as e:
        print(f"token-prune bench: AGREEMENT CHECK FAILED: {e}", file=sys.stderr)
        status = 3
    finally:
        bench.close()
    paths = save(final=True)
    log("wrote " + ", ".join(paths.values()))
    return status


def _smallest_per_series(settings: list[Setting]) -> list[Setting]:
    best: dict[str, Setting] = {}
    for s in settings:
        if s.family_key not in best or s.keep_ratio < best[s.family_key].keep_ratio:
            best[s.family_key] = s
    # One GlimpsePrune entry is enough for decode: every K leaves the same caches.
    out, glimpse_seen = [], False
    for s in best.values():
        if s.method == "glimpse":
            if glimpse_seen:
                continue
            glimpse_seen = True
        out.append(s)
    return out


def _cost_only(o: dict, arch: dict, config, log) -> int:
    family = arch["family"]
    L = config.text_config.num_hidden_layers
    settings = expand_settings(o["settings"], o["keep_ratios"], family, L)
    a = cm.arch_from_config(config, dtype_bytes=torch.tensor([], dtype=getattr(torch, o["dtype"])).element_size())
    lay = cm.prompt_layout(config, tuple(o["image"]), o["text_before"], o["text_after"])
    gpu = os.environ.get("TOKEN_PRUNE_COST_GPU", "H100")
    rows = []
    for s in settings:
        est = cm.estimate(
            a,
            lay,
            tuple(o["image"]),
            s.method,
            keep_ratio=s.keep_ratio,
            K=s.options.get("layer"),
            start_layer=s.options.get("start_layer", 0),
            skipped=s.options.get("skipped", "context"),
            batch=o["batch"],
            decode_tokens=o["decode_tokens"],
            gpu=gpu,
        )
        rows.append(
            {
                "setting": s.label,
                "method": s.method,
                "options": s.options,
                "series": s.family_key,
                "keep_ratio": s.keep_ratio,
                "batch": o["batch"],
                "visual_tokens": lay["visual"],
                "kept_tokens": est["kept_tokens"],
                "kv_len": est["kv_len"],
                "kv_cache_bytes": est["kv_cache_bytes"],
                "memory": {},
                "cost": est,
            }
        )
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "tag": o.get("tag"),
        "env": environment(None),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()},
        "model": {
            "name": arch["name"],
            "title": arch.get("title"),
            "family": family,
            "params": arch.get("params"),
            "text_tokens": lay["text"],
            "visual_tokens": lay["visual"],
            "prompt_tokens": lay["prompt"],
            "layers": L,
            "arch": a.to_dict(),
        },
        "check": [],
        "latency": rows,
        "sweep": [],
        "largest_batch": {},
        "notes": [f"cost model only (--cost-only): no model was built or timed; roofline times for {gpu}"],
    }
    with_ratios(results)
    log(
        f"{arch['title']}: {lay['text']} text + {lay['visual']} visual tokens, image {o['image'][0]}x{o['image'][1]}, "
        f"batch {o['batch']} (cost model; roofline on {gpu})"
    )
    log(
        f"  {'setting':<28} {'LM GFLOP':>10} {'ratio':>7} {'floor':>7} {'TTFT ratio':>10} {'decode GB':>10} "
        f"{'KV MiB':>8} "
        f"{'LM ms*':>8} {'dec ms*':>8}"
    )
    for r in rows:
        c, q = r["cost"], r["ratios"]
        roof = c.get("roofline_ms") or {}
        log(
            f"  {r['setting']:<28} {c['totals']['lm_prefill_flops'] / 1e9:10.1f} {q['model_lm_prefill_flops']:7.3f} "
            f"{q['floor']:7.3f} {q['model_ttft_flops']:10.3f} {c['totals']['decode_step_bytes'] / 1e9:10.3f} "
            f"{c['kv_cache_bytes'] / (1 << 20):8.1f} {_fmt(roof.get('lm_prefill'), '8.2f')} "
            f"{_fmt(roof.get('decode_step'), '8.3f')}"
        )
    log("  (* roofline lower bounds)")
    stem = _stem(o, arch["name"]) + "_cost"
    paths = write_reports(results, o["out_dir"], stem, want_plot=False)
    log("wrote " + ", ".join(paths.values()))
    return 0


def _report_from(args, log) -> int:
    merged = None
    for path in args.report_from:
        with open(path) as f:
            r = json.load(f)
        if r.get("schema") != SCHEMA:
            raise BenchError(f"{path}: not a {SCHEMA} file")
        if merged is None:
            merged = r
            merged.setdefault("notes", [])
            continue
        for key in ("check", "latency", "sweep"):
            merged[key] = (merged.get(key) or []) + (r.get(key) or [])
        merged["largest_batch"] = {**(merged.get("largest_batch") or {}), **(r.get("largest_batch") or {})}
        merged["notes"].append(f"merged from {os.path.basename(path)}")
    merged["notes"] = [n for n in merged["notes"] if not n.startswith("no plot:")]
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.report_from[0]))
    stem = (
        f"{os.path.splitext(os.path.basename(args.report_from[0]))[0]}"
        + ("_merged" if len(args.report_from) > 1 else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    paths = write_reports(merged, out_dir, stem, want_plot=not args.no_plot)
    log("wrote " + ", ".join(paths.values()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m token_prune.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (BenchError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"token-prune bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
