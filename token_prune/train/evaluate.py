"""``evaluate_vip``: the real pruned inference path against the full model, sample by sample."""

from __future__ import annotations


import torch

from .. import hf
from ..data import Encoded, as_dataset, prompt_inputs
from .loop import _load_modules, _to_device, default_processor


# --------------------------------------------------------------------------------------------
# evaluate_vip
# --------------------------------------------------------------------------------------------


def _answer_logprobs(model, enc: Encoded, device, dtype) -> torch.Tensor:
    """[A, V] float32 log-probs of the answer positions: prefill the prompt, then feed the answer
    tokens (but the last) as one chunk on the cache, without mask or positions, so a patched model
    decodes exactly as it would in generation."""
    pin = _to_device(prompt_inputs(enc), device, dtype)
    answer = enc.answer_ids.to(device)
    out = model(**pin, use_cache=True)
    rows = [out.logits[0, -1:]]
    if answer.numel() > 1:
        step = model(input_ids=answer[None, :-1], use_cache=True, **hf.cache_kwargs(model, hf.output_cache(out)))
        rows.append(step.logits[0])
    out = torch.cat(rows)
    return out.to(torch.promote_types(out.dtype, torch.float32)).log_softmax(-1)


def _greedy(model, enc: Encoded, n: int, device, dtype, eos: set[int]) -> list[int]:
    pin = _to_device(prompt_inputs(enc), device, dtype)
    out = model.generate(**pin, max_new_tokens=n, do_sample=False)[0, pin["input_ids"].shape[1]:].tolist()
    for j, t in enumerate(out):
        if t in eos:
            return out[:j + 1]
    return out


@torch.no_grad()
def evaluate_vip(model, vip, dataset, *, processor=None, threshold: float = 0.5, keep_ratio: float | None = None,
                 max_keep_ratio: float | None = None, min_keep: int = 1, layer: int | None = None,
                 max_new_tokens: int | None = None, generate: bool = True, limit: int | None = None,
                 progress: bool = False, return_samples: bool = False) -> dict:
    """Evaluate a trained VIP on held-out rows through the real patched inference path.

    For every row (batch size 1): the full model's and the pruned model's (``token_prune.patch``
    with ``method="glimpse"``) teacher-forced answer distributions, and their greedy answers.

    Args:
        vip: a directory (``GlimpseModules.save`` or public format) or a :class:`GlimpseModules`.
        threshold, keep_ratio, max_keep_ratio, min_keep, layer: the pruning options
            (``keep_ratio`` fixes the kept fraction instead of the threshold rule).
        max_new_tokens: greedy tokens per answer (default: the reference answer's length).
        generate: also compare greedy answers.
        limit: evaluate only the first rows.

    Returns:
        dict with ``samples``, ``keep_ratio`` (mean kept fraction of visual tokens), ``kl``
        (mean over rows of the per-token KL(full || pruned) on the answer tokens),
        ``kl_first`` (the first answer token only), ``greedy_match`` (fraction of rows whose greedy
        answers are identical), ``token_agreement`` (fraction of the full model's greedy tokens
        the pruned model reproduces at the same position), ``options``; with ``return_samples``
        also ``per_sample``.
    """
    from .. import api

    if api.get_handle(model) is not None:
        raise ValueError("the model is patched; call token_prune.unpatch(model) before evaluating")
    data = as_dataset(dataset)
    proc = default_processor(model, processor)
    modules = _load_modules(vip)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = set(getattr(proc, "eos_ids", set()) or ())
    if getattr(proc, "eos_id", None) is not None:
        eos.add(proc.eos_id)
    options = dict(threshold=threshold, keep_ratio=keep_ratio, max_keep_ratio=max_keep_ratio, min_keep=min_keep)
    if layer is not None:
        options["layer"] = layer
    rows = list(data)[:limit] if limit else list(data)
    was_training = model.training
    model.eval()
    samples = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="eval-vip", dynamic_ncols=True)
    try:
        for row in rows:
            enc = proc.encode(row)
            full = _answer_logprobs(model, enc, device, dtype)
            n = max_new_tokens or int(enc.answer_ids.numel())
            g_full = _greedy(model, enc, n, device, dtype, eos) if generate else None
            with api.patch(model, method="glimpse", vip=modules, **options) as handle:  # (our own copy)
                pruned = _answer_logprobs(model, enc, device, dtype)
                stats = handle.stats[0]
                g_pruned = _greedy(model, enc, n, device, dtype, eos) if generate else None
                k_used = handle.method.layer
            kl_tok = (full.exp() * (full - pruned)).sum(-1)
            s = dict(ref=row.ref, keep_ratio=stats["keep_ratio"], kept=stats["kept_tokens"],
                     visual=stats["visual_tokens"], kl=float(kl_tok.mean()), kl_first=float(kl_tok[0]))
            if generate:
                s["greedy_match"] = g_full == g_pruned
                s["token_agreement"] = sum(a == b for a, b in zip(g_full, g_pruned)) / max(1, len(g_full))
                s["full_answer"], s["pruned_answer"] = g_full, g_pruned
            samples.append(s)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{s['kl']:.4f}", keep=f"{s['keep_ratio']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    mean = lambda k: sum(s[k] for s in samples) / len(samples)  # noqa: E731
    out = dict(samples=len(samples), layer=k_used, keep_ratio=mean("keep_ratio"), kl=mean("kl"),
               kl_first=mean("kl_first"), options={k: v for k, v in options.items()})
    if generate:
        out["greedy_match"] = mean("greedy_match")
        out["token_agreement"] = mean("token_agreement")
    if return_samples:
        out["per_sample"] = samples
    return out
