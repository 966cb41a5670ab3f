"""The benchmark runner: builds inputs, patches, checks agreement, times prefill / TTFT /
decode and memory, and sweeps decode batch sizes."""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings

import torch

from .. import costmodel as cm
from .. import nvtx
from .archs import synthetic_inputs
from .settings import BenchError, Setting
from .timing import Clock, L2Flush, StageHooks, _median, _nvtx_name, _step_marker_class, _summary, compare_generations


# ======================================================================================
# The benchmark
# ======================================================================================


class Bench:
    def __init__(self, model, arch: dict, opts: dict, log=print):
        from ..models import adapter_for

        self.model = model
        self.arch = arch
        self.o = opts
        self.log = log
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype
        self.cuda = self.device.type == "cuda"
        # Thread CPU time is the run's time only while torch computes on the calling thread alone.
        self.clock = Clock(self.device, thread=opts.get("cpu_clock", "thread") == "thread"
                           and torch.get_num_threads() == 1)
        self.flush = L2Flush(self.device)
        self.hooks = StageHooks(model, self.clock)
        self.adapter = adapter_for(model)
        self.family = model.config.model_type
        # The ALVTS score's CPU kernel forms each logit once, its CUDA kernel twice.
        self.cost_arch = cm.arch_from_config(model.config, dtype_bytes=p.element_size(),
                                             score_passes=2 if self.cuda else 1)
        self.image = tuple(opts["image"])
        self.frames = opts.get("video_frames")
        self.layout = cm.prompt_layout(model.config, self.image, opts["text_before"], opts["text_after"], self.frames)
        self.weights_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        self._inputs: dict = {}
        self._selectors: dict = {}
        self.gpu = torch.cuda.get_device_name(self.device) if self.cuda else None
        self.machine_peak = None  # CPU: measured FLOP/s and bandwidth for the cost model's roofline
        if not self.cuda and opts.get("cpu_roofline", True):
            from .timing import cpu_peaks

            lm = self.cost_arch.lm
            self.machine_peak = cpu_peaks(self.dtype, self.layout["prompt"], lm.hidden, lm.intermediate)

    # -- helpers -----------------------------------------------------------------------
    def inputs(self, batch: int, cache: bool = True) -> dict:
        if batch in self._inputs:
            return self._inputs[batch]
        x = synthetic_inputs(
            self.model, self.image, batch, self.o["text_before"], self.o["text_after"], seed=self.o["seed"],
            video_frames=self.frames,
        )
        if cache:
            self._inputs = {batch: x}
        return x

    def _random_selector(self, form: str, rank: int, start: int):
        key = (form, rank, start)
        if key not in self._selectors:
            from ..methods.alvts_selector import selector_class

            g = torch.Generator(device=self.device).manual_seed(self.o["seed"] + 7)
            layers = list(range(start, self.adapter.num_layers))
            self._selectors = {key: selector_class(form).random(self.adapter, rank, layers, g, self.device, self.dtype)}
        return self._selectors[key]

    def patch_options(self, setting: Setting) -> dict:
        opts = dict(setting.options)
        if setting.method == "alvts" and self.o["alvts_selector"] == "random" and "selector" not in opts:
            from ..methods.alvts_selector import default_form, default_rank

            form = opts.get("selector_form") or default_form(self.adapter)
            rank = opts.get("rank") or default_rank(self.adapter, form)
            opts["rank"] = rank
            opts["selector"] = self._random_selector(form, rank, opts.get("start_layer", 0))
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
            if rt is not None:
                rt.captures.clear()
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
        kw = dict(
            keep_ratio=setting.keep_ratio,
            K=o.get("layer"),
            start_layer=o.get("start_layer", 0),
            skipped=o.get("skipped", "context"),
            selector_form=o.get("selector_form"),
            alvts_rank=o.get("rank"),
            batch=batch,
            decode_tokens=decode_tokens or self.o["decode_tokens"],
            kept=kept,
        )
        args = (self.cost_arch, self.layout, self.image, setting.method)
        if self.machine_peak is not None:
            self._measure_rows(cm.estimate(*args, **kw))
        return cm.estimate(*args, **kw, gpu=self.gpu, peak=self.machine_peak)

    def _measure_rows(self, est: dict) -> None:
        """Add this CPU's matrix-product throughput at every row count ``est``'s stages run to
        the roofline's ``flops_by_rows`` (a pruned decoder's layers run on a tenth of the rows,
        where a CPU BLAS is far from its rate on the whole prompt): the peak measured on the
        prompt's rows times the rate at those rows relative to the prompt's, measured in paired
        rounds (:func:`~token_prune.bench.timing.linear_rate_ratios`)."""
        from .timing import linear_rate_ratios

        table = self.machine_peak.setdefault("flops_by_rows", {})
        lm = self.cost_arch.lm
        base = self.layout["prompt"]
        new = sorted({int(c.get("rows") or 0) for part in ("vision", "lm_prefill", "decode_step")
                      for c in est[part].values()} - {0} - {int(r) for r in table})
        if new:
            rel = linear_rate_ratios(self.dtype, base, new, lm.hidden, lm.intermediate)
            table.update({str(r): self.machine_peak["flops"] * rel[r] for r in new})

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
        res: dict = setting.record(batch)
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
        est, tokens = self.token_fields(setting, stats, batch)
        res.update(
            {
                "ttft_ms": _summary(ttft),
                "lm_prefill_ms": _summary(lm),
                "vision_ms": _summary(vis),
                "other_ms": _median([t - (l or 0) - (v or 0) for t, l, v in zip(ttft, lm, vis, strict=True)]),
                "generate_prefill_ms": _summary([g["prefill_ms"] for g in gens]),
                "decode_step_ms": _summary([g["decode_step_ms"] for g in gens]),
                "decode_tok_s": _summary([g["decode_tok_s"] for g in gens]),
                **tokens,
                "memory": self._memory(resident, peak_prefill, peak_gen),
                "stats": stats,
                "cost": est,
            }
        )
        return res

    def token_fields(self, setting: Setting, stats: list[dict], batch: int) -> tuple[dict, dict]:
        """(the cost model's estimate, the result row's token and KV-cache fields) of ``setting``
        from the ``handle.stats`` of its last run (both timing modes)."""
        visual = self.layout["visual"]
        if stats:
            s0 = stats[0]
            kept, kv, processed = s0.get("kept_tokens"), s0.get("kv_len"), s0.get("visual_processed")
            if processed:  # ALVTS keeps every token in the residual stream; report what a layer processes
                kept = max(processed[setting.options.get("start_layer", 0) :] or processed)
        else:
            kept, kv, processed = visual, [self.layout["prompt"]] * self.cost_arch.lm.layers, None
        est = self.estimate(setting, batch, kept=kept if setting.method != "alvts" else None)
        kvb = self.cost_arch.lm.kv_bytes_per_token(self.cost_arch.dtype_bytes)
        return est, {
            "decode_tokens": self.o["decode_tokens"],
            "visual_tokens": visual,
            "kept_tokens": kept,
            "visual_processed_per_layer": processed,
            "kv_len": kv,
            "kv_cache_bytes": batch * sum(kv) * kvb if kv else None,
        }

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
            inputs = synthetic_inputs(self.model, self.image, B, o["text_before"], o["text_after"], seed=o["seed"],
                                      video_frames=self.frames)
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
