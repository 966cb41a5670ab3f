"""Calibration of the ALVTS selector: fit each layer's selector parameters, the model frozen, so
that the selector's importance score matches the full-rank one (:func:`calibrate_alvts`), measure
how well it does (:func:`score_error`), and the ``token-prune calibrate-alvts`` command.

The paper calls this "importance-consistency constrained low-rank approximation": start from the
truncated SVD of the layer's own projections (for the per-group form: of its rotary-aware
head-summed q/k map, :mod:`~token_prune.methods.alvts_selector`), then minimise the error of the
*score* (not of the weights) on a small calibration set.
"""

from __future__ import annotations

import json
import math
import os

import torch

from . import hf
from .api import get_handle
from .methods.alvts import topk_per_image
from .methods.alvts_selector import (LowRankSelector, check_form, default_form, default_rank, received_score,
                                     selector_class)
from .methods.base import image_sizes
from .models import DEFAULT_MODEL, adapter_for, supported_models

#: Adam step size per form when none is given: absolute for the full-width factors, relative to
#: each tensor's mean magnitude for the per-group maps (whose scale follows the q/k weights).
DEFAULT_LR = {"full_width": 1e-3, "group_rope": 0.02}


class _Stop(Exception):
    pass


def layer_inputs(model, adapter, inputs: dict, layer: int):
    """Input hidden states [B, S, H] and rotary (cos, sin) of decoder layer ``layer`` in the
    unpatched model; the forward is cut short right after that layer's input is seen."""
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        seen["rope"] = tuple(t.detach() for t in kwargs["position_embeddings"])
        raise _Stop

    h = adapter.lm.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen["x"], seen["rope"]


def _masks(model, inputs):
    ids = inputs["input_ids"]
    valid = inputs.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    visual = adapter_for(model).visual_mask(input_ids=ids)
    return valid, visual


@torch.no_grad()
def full_rank_score(adapter, layer: int, x: torch.Tensor, cos, sin, valid, visual) -> torch.Tensor:
    """S* [B, S]: ALVTS's score from the layer's exact q/k (every head its own softmax), the
    target every selector is fitted and judged against."""
    q, k = adapter.project_qk(layer, x, cos, sin)
    return received_score(q, k, visual, valid, 1.0 / math.sqrt(adapter.head_dim))


def score_error(selector, model, samples, layers=None) -> dict:
    """Relative squared error of the selector's scores against the full-rank oracle and the
    overlap of its per-image top-k with the oracle's top-k (k = 11% of each image), per layer.

    Returns ``{"rel_mse": [per layer], "topk_overlap": [per layer]}`` averaged over ``samples``.
    """
    adapter = adapter_for(model)
    layers = layers if layers is not None else sorted(int(k) for k in selector.layers)
    rel, overlap = [], []
    for li in layers:
        r_sum = o_sum = 0.0
        for inputs in samples:
            x, (cos, sin) = layer_inputs(model, adapter, inputs, li)
            valid, visual = _masks(model, inputs)
            oracle = full_rank_score(adapter, li, x, cos, sin, valid, visual)
            with torch.no_grad():
                got = selector.scores(adapter, li, x, cos, sin, valid, visual)
            r_sum += float(_rel_mse(got, oracle, visual))
            sizes = image_sizes(visual, None)
            a = topk_per_image(oracle, visual, sizes, 0.11)
            b = topk_per_image(got, visual, sizes, 0.11)
            o_sum += float((a & b).sum()) / max(1, int(a.sum()))
        rel.append(r_sum / len(samples))
        overlap.append(o_sum / len(samples))
    return {"layers": layers, "rel_mse": rel, "topk_overlap": overlap}


def _rel_mse(got, oracle, visual):
    # Scores are products of mean attentions (~1/N^2): compare relative to the oracle's scale.
    g, o = got[visual].float(), oracle[visual].float()
    return ((g - o) ** 2).mean() / (o ** 2).mean().clamp(min=1e-30)


def calibrate_alvts(model, samples, rank: int | None = None, steps: int = 200, lr: float | None = None,
                    start_layer: int = 0, out: str | os.PathLike | None = None, progress: bool = True,
                    seed: int = 0, proj_weight: float = 0.5, val_fraction: float = 0.25,
                    selector_form: str | None = None) -> LowRankSelector:
    """Fit the ALVTS selector of every layer to the full-rank score (model frozen).

    Starts from the SVD start of the form (:meth:`LowRankSelector.from_weights`) and minimises,
    with Adam, the squared error between the selector's score S and the full-rank score S*
    (:func:`full_rank_score`, on the unpatched model's own layer inputs), relative to the oracle's
    scale, summed over ``samples``. Early stopping on a held-out ``val_fraction`` of the samples:
    the parameters of the best validation step are kept, and step 0 is the SVD start, so
    validation never ends worse than SVD. The full-width form adds a data-aware projection term
    (``proj_weight`` times the relative error of its q/k against the exact q/k on the same
    tokens); the per-group form has no per-head q/k to compare and fits the score alone.

    Args:
        model: an unpatched supported model (its weights are not changed).
        samples: list of model input dicts (processor output), each a batch with images.
        rank: selector rank R (default: the form's per-model default).
        steps: optimisation steps per layer (each step visits every training sample).
        lr: Adam step size (default :data:`DEFAULT_LR` of the form; relative to each tensor's
            mean magnitude for ``group_rope``).
        start_layer: first layer to calibrate (layers before it are never pruned by ALVTS).
        out: directory to save the selector to (``selector.safetensors`` + ``selector.json``).
        selector_form: ``"group_rope"`` or ``"full_width"`` (default: the model's default form,
            :func:`~token_prune.methods.alvts_selector.default_form`).

    Returns:
        The calibrated selector (:class:`~token_prune.methods.alvts_selector.GroupRopeSelector`
        or :class:`~token_prune.methods.alvts_selector.FullWidthSelector`), in the model's dtype.
    """
    from tqdm.auto import tqdm

    if get_handle(model) is not None:
        raise ValueError("calibrate_alvts needs the unpatched model: remove the patch first")
    if not samples:
        raise ValueError("calibrate_alvts needs at least one sample")
    adapter = adapter_for(model)
    form = check_form(selector_form) if selector_form is not None else default_form(adapter)
    cls = selector_class(form)
    rank = rank or default_rank(adapter, form)
    cls.check_rank(adapter, rank)
    lr = DEFAULT_LR[form] if lr is None else float(lr)
    relative_lr = form == "group_rope"
    # Linear-attention layers of a hybrid decoder are scored with the next attention layer's q/k.
    attention = hf.attention_layers(adapter.lm_config)
    layers = sorted({next((j for j in attention if j >= i), attention[-1]) for i in range(start_layer, adapter.num_layers)})
    selector = cls.from_weights(adapter, rank, layers)
    param = next(model.parameters())
    selector.to(device=param.device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=gen).tolist()
    n_val = int(round(val_fraction * len(samples))) if len(samples) >= 4 else 0
    val_idx, train_idx = set(order[:n_val]), order[n_val:]
    bar = tqdm(total=len(layers) * steps, desc=f"calibrating ALVTS ({form}, R={rank})", disable=not progress)
    history = {}
    scale = selector.scale(adapter)
    for li in layers:
        data = []
        for inputs in samples:
            x, (cos, sin) = layer_inputs(model, adapter, inputs, li)
            valid, visual = _masks(model, inputs)
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = received_score(q, k, visual, valid, 1.0 / math.sqrt(adapter.head_dim)).float()
            exact = (q.float(), k.float()) if form == "full_width" else None
            data.append((x, cos, sin, valid, visual, oracle, exact))
        # Optimise in float32 whatever the model dtype; write back in the model's dtype.
        params = {n: torch.nn.Parameter(p.detach().float().clone()) for n, p in selector.layer_params(li).items()}
        groups = [{"params": [p], "lr": lr * (float(p.detach().abs().mean()) or 1.0) if relative_lr else lr}
                  for p in params.values()]
        opt = torch.optim.Adam(groups)

        def score_and_qk(i, params=params):
            x, cos, sin, valid, visual = data[i][:5]
            q, k = selector.qk(adapter, li, x, cos, sin, params)
            return received_score(q, k, visual, valid, scale), q, k

        def loss_of(i):
            valid, visual, oracle, exact = data[i][3:]
            score, q, k = score_and_qk(i)
            loss = _rel_mse(score, oracle, visual)
            if exact is not None and proj_weight:
                m = valid[:, None, :, None]
                for a, b in zip((q, k), exact):
                    loss = loss + proj_weight * ((a - b) ** 2 * m).sum() / ((b ** 2) * m).sum().clamp(min=1e-30) / 2
            return loss

        def val_loss():
            if not val_idx:
                return None
            with torch.no_grad():
                return sum(float(_rel_mse(score_and_qk(i)[0], data[i][5], data[i][4])) for i in val_idx) / len(val_idx)

        best = (val_loss(), {n: p.detach().clone() for n, p in params.items()})
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            total = 0.0
            for i in train_idx:
                loss = loss_of(i) / len(train_idx)
                loss.backward()
                total += loss.item()
            opt.step()
            v = val_loss()
            if v is not None and v < best[0]:
                best = (v, {n: p.detach().clone() for n, p in params.items()})
            losses.append(total)
            bar.update(1)
            bar.set_postfix(layer=li, loss=f"{total:.3g}", val=f"{v:.3g}" if v is not None else "-")
        history[li] = losses
        chosen = best[1] if best[0] is not None else {n: p.detach() for n, p in params.items()}
        with torch.no_grad():
            for n, p in selector.layer_params(li).items():
                p.copy_(chosen[n].to(p.dtype))
    bar.close()
    selector.to(dtype=param.dtype)
    selector.calibration_loss = history
    if out is not None:
        selector.save(out, meta={"model_type": adapter.model_type, "num_layers": adapter.num_layers,
                                 "hidden_size": adapter.hidden_size, "steps": steps, "lr": lr,
                                 "samples": len(samples), "start_layer": start_layer,
                                 "final_loss": {str(k): v[-1] for k, v in history.items()}})
    return selector


# -- command line ---------------------------------------------------------------------------

def add_subcommands(sub) -> None:
    p = sub.add_parser("calibrate-alvts", help="fit ALVTS's low-rank selector to the full-rank score (model frozen)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory (model + processor)")
    g.add_argument("--tiny", nargs="?", const=DEFAULT_MODEL, choices=supported_models(),
                   help="a built-in tiny random-weight model with synthetic data (offline)")
    p.add_argument("--data", metavar="FILE.jsonl", help='rows {"image": path, "question": str, ...}')
    p.add_argument("--out", required=True, metavar="DIR", help="where selector.safetensors + selector.json go")
    p.add_argument("--samples", type=int, default=256, help="rows to calibrate on (the paper uses 256)")
    p.add_argument("--selector-form", choices=["group_rope", "full_width"], default=None,
                   help="per-KV-group rotary-aware rank-space map (the default where the decoder allows it) or "
                        "full-width low-rank q/k")
    p.add_argument("--rank", type=int, default=None, help="default: the form's per-model rank")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 full_width, 0.02 (relative) group_rope")
    p.add_argument("--start-layer", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rows per calibration batch")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_calibrate)


def _calibrate(args) -> int:
    from .data import collate, load_jsonl, make_synthetic_dataset, prompt_inputs
    from .train import load_model

    model, proc = load_model(args.model, args.tiny, args.device, args.dtype)
    data = args.data
    if data is None:
        if args.tiny is None:
            raise ValueError("--data FILE.jsonl is required with --model")
        data = make_synthetic_dataset(os.path.join(args.out, "synthetic_calibration"), args.samples, seed=args.seed)
    rows = list(load_jsonl(data))[: args.samples]
    if not rows:
        raise ValueError(f"{data}: no rows")
    pad = getattr(model.generation_config, "pad_token_id", None) or 0
    encoded = [proc.encode(r) for r in rows]
    batches = []
    for i in range(0, len(encoded), args.batch_size):
        chunk = encoded[i:i + args.batch_size]
        # prompt only: the selector scores the prompt the way prefill does
        prompts = [type(e)(inputs=prompt_inputs(e), prompt_len=e.prompt_len, boxes=None, ref=e.ref) for e in chunk]
        batch = collate(prompts, pad)["inputs"]
        batches.append({k: v.to(model.device) for k, v in batch.items()})
    selector = calibrate_alvts(model, batches, rank=args.rank, steps=args.steps, lr=args.lr,
                               start_layer=args.start_layer, out=args.out, progress=not args.no_progress,
                               seed=args.seed, selector_form=args.selector_form)
    n_eval = min(len(batches), 8)
    svd = type(selector).from_weights(adapter_for(model), selector.rank, sorted(int(k) for k in selector.layers))
    report = {"calibrated": score_error(selector, model, batches[:n_eval]),
              "svd": score_error(svd, model, batches[:n_eval])}
    with open(os.path.join(args.out, "calibration_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"wrote {args.out}: {selector.form} rank {selector.rank}, {len(rows)} rows; on {n_eval} calibration batches "
          f"rel. score error SVD {mean(report['svd']['rel_mse']):.3f} -> {mean(report['calibrated']['rel_mse']):.3f}, "
          f"top-11% overlap {mean(report['svd']['topk_overlap']):.3f} -> {mean(report['calibrated']['topk_overlap']):.3f}")
    return 0
