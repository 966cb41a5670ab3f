"""End-to-end benchmark of token_prune's methods on full-size vision-language architectures.

    token-prune bench --preset qwen2_5_vl_7b_4k        # Qwen2.5-VL-7B, 4096 visual tokens (GPU)
    token-prune bench --model llava_1_5_7b --setting none --setting fastv:layer=2 --keep-ratios 0.11,0.5
    token-prune bench --tiny                           # tiny models on the CPU, in seconds
    token-prune bench --preset qwen2_5_vl_7b_4k --cost-only   # the analytic cost model alone, no model built
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

from .archs import build_model, hf_config, init_random_, list_archs, load_arch, synthetic_inputs
from .cli import PRESETS, add_arguments, main, resolve_options, run
from .report import markdown, plot, with_ratios, write_reports
from .runner import Bench
from .settings import SCHEMA, AgreementError, BenchError, Setting, default_options, expand_settings, parse_setting
from .timing import compare_generations

__all__ = ["Bench", "BenchError", "AgreementError", "PRESETS", "SCHEMA", "Setting", "add_arguments", "build_model",
           "compare_generations", "default_options", "expand_settings", "hf_config", "init_random_", "list_archs",
           "load_arch", "main", "markdown", "parse_setting", "plot", "resolve_options", "run", "synthetic_inputs",
           "with_ratios", "write_reports"]
