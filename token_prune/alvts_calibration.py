"""Calibration of the ALVTS selector: fit each layer's low-rank query/key factors, the model
frozen, so that the selector's importance score matches the full-rank one
(:func:`calibrate_alvts`), measure how well it does (:func:`score_error`), and the
``token-prune calibrate-alvts`` command.

The paper calls this "importance-consistency constrained low-rank approximation": start from the
truncated SVD of the layer's own projections, then minimise the error of the *score* (not of the
weights) on a small calibration set.
"""

from __future__ import annotations

import json
import os

import torch

from . import hf
from .api import get_handle
from .methods.alvts import LowRankSelector, selection_scores, topk_per_image
from .methods.base import image_sizes
from .models import DEFAULT_MODEL, adapter_for, supported_models
from .models.base import head_norm


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
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = selection_scores(q, k, valid, visual)
                q, k = selector.qk(adapter, li, x, cos, sin)
                got = selection_scores(q, k, valid, visual)
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


def calibrate_alvts(model, samples, rank: int | None = None, steps: int = 200, lr: float = 1e-3,
                    start_layer: int = 0, out: str | os.PathLike | None = None, progress: bool = True,
                    seed: int = 0, proj_weight: float = 0.5, val_fraction: float = 0.25) -> LowRankSelector:
    """Fit the ALVTS low-rank selector of every layer to the full-rank score (model frozen).

    Starts from the truncated-SVD factors of each layer's q/k projections and minimises, with
    Adam, the squared error between the low-rank score S and the oracle score S* (both from
    :func:`selection_scores`, on the unpatched model's own layer inputs), relative to the
    oracle's scale, summed over ``samples``. Two guards against over-fitting a small
    calibration set: a data-aware projection term (``proj_weight`` times the relative error of
    the low-rank q/k against the full-rank q/k on the same tokens) and early stopping on a
    held-out ``val_fraction`` of the samples (the factors of the best validation step are kept,
    and step 0 is the SVD start, so validation never ends worse than SVD).

    Args:
        model: an unpatched supported model (its weights are not changed).
        samples: list of model input dicts (processor output), each a batch with images.
        rank: factor rank R (default: the per-model default).
        steps: optimisation steps per layer (each step visits every sample).
        start_layer: first layer to calibrate (layers before it are never pruned by ALVTS).
        out: directory to save the selector to (``selector.safetensors`` + ``selector.json``).

    Returns:
        The calibrated :class:`LowRankSelector`.
    """
    from tqdm.auto import tqdm

    if get_handle(model) is not None:
        raise ValueError("calibrate_alvts needs the unpatched model: remove the patch first")
    if not samples:
        raise ValueError("calibrate_alvts needs at least one sample")
    adapter = adapter_for(model)
    rank = rank or adapter.default_alvts_rank()
    layers = list(range(start_layer, adapter.num_layers))
    selector = LowRankSelector.from_svd(adapter, rank, layers)
    param = next(model.parameters())
    selector.to(device=param.device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=gen).tolist()
    n_val = int(round(val_fraction * len(samples))) if len(samples) >= 4 else 0
    val_idx, train_idx = set(order[:n_val]), order[n_val:]
    bar = tqdm(total=len(layers) * steps, desc="calibrating ALVTS", disable=not progress)
    history = {}
    for li in layers:
        data = []
        for inputs in samples:
            x, (cos, sin) = layer_inputs(model, adapter, inputs, li)
            valid, visual = _masks(model, inputs)
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = selection_scores(q, k, valid, visual).float()
            data.append((x, cos, sin, valid, visual, oracle, q.float(), k.float()))
        f = selector.layers[str(li)]
        # Optimise in float32 whatever the model dtype; write back in the model's dtype.
        params = {n: torch.nn.Parameter(getattr(f, n).detach().float().clone()) for n in ("q_a", "q_b", "k_a", "k_b")}
        opt = torch.optim.Adam(params.values(), lr=lr)

        def loss_of(i):
            x, cos, sin, valid, visual, oracle, q_full, k_full = data[i]
            q, k = _lowrank_qk(adapter, li, x, cos, sin, params)
            loss = _rel_mse(selection_scores(q, k, valid, visual), oracle, visual)
            if proj_weight:
                m = valid[:, None, :, None]
                for a, b in ((q, q_full), (k, k_full)):
                    loss = loss + proj_weight * ((a - b) ** 2 * m).sum() / ((b ** 2) * m).sum().clamp(min=1e-30) / 2
            return loss

        def val_loss():
            if not val_idx:
                return None
            with torch.no_grad():
                return sum(float(_rel_mse(selection_scores(*_lowrank_qk(adapter, li, *data[i][:3], params),
                                                           data[i][3], data[i][4]), data[i][5], data[i][4]))
                           for i in val_idx) / len(val_idx)

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
            for n, p in chosen.items():
                getattr(f, n).copy_(p.to(getattr(f, n).dtype))
    bar.close()
    selector.to(dtype=param.dtype)
    selector.calibration_loss = history
    if out is not None:
        selector.save(out, meta={"model_type": adapter.model_type, "num_layers": adapter.num_layers,
                                 "hidden_size": adapter.hidden_size, "steps": steps, "lr": lr,
                                 "samples": len(samples), "start_layer": start_layer,
                                 "final_loss": {str(k): v[-1] for k, v in history.items()}})
    return selector


def _lowrank_qk(adapter, layer, x, cos, sin, params):
    """Differentiable low-rank q~/k~ (float32) for calibration."""
    mod = adapter.lm.layers[layer]
    attn = mod.self_attn
    with torch.no_grad():
        h = mod.input_layernorm(x).float()
    B, S, _ = h.shape
    d = adapter.head_dim
    q = (h @ params["q_a"].T) @ params["q_b"].T
    k = (h @ params["k_a"].T) @ params["k_b"].T
    if attn.q_proj.bias is not None:
        q = q + attn.q_proj.bias.float()
    if attn.k_proj.bias is not None:
        k = k + attn.k_proj.bias.float()
    q = head_norm(attn, "q", q.view(B, S, -1, d)).float().transpose(1, 2)
    k = head_norm(attn, "k", k.view(B, S, -1, d)).float().transpose(1, 2)
    return hf.apply_rotary(q, cos.float(), sin.float()), hf.apply_rotary(k, cos.float(), sin.float())


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
    p.add_argument("--rank", type=int, default=None, help="default: the per-model rank")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
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
                               seed=args.seed)
    n_eval = min(len(batches), 8)
    svd = LowRankSelector.from_svd(adapter_for(model), selector.rank, sorted(int(k) for k in selector.layers))
    report = {"calibrated": score_error(selector, model, batches[:n_eval]),
              "svd": score_error(svd, model, batches[:n_eval])}
    with open(os.path.join(args.out, "calibration_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"wrote {args.out}: rank {selector.rank}, {len(rows)} rows; on {n_eval} calibration batches "
          f"rel. score error SVD {mean(report['svd']['rel_mse']):.3f} -> {mean(report['calibrated']['rel_mse']):.3f}, "
          f"top-11% overlap {mean(report['svd']['topk_overlap']):.3f} -> {mean(report['calibrated']['topk_overlap']):.3f}")
    return 0
