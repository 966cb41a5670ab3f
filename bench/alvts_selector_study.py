"""Which low-rank form should the ALVTS selector take? A study on Qwen2.5-VL models built offline.

For every studied decoder layer, on that layer's own inputs in the unpatched model, candidate
selector forms are compared with the full-rank score S* (every head, exact q and k, rotary):

* ``full_width``: the current selector. Rank-R factors of ``q_proj`` and ``k_proj`` separately,
  expanded back to every head's q and k (width heads x head_dim), one softmax per head. Its
  score costs as much as the layer's own attention, whatever R is.
* ``shared_norope``: one head-shared rank-R logit map, the truncated SVD of
  ``sum_h W'_Qh^T W'_Kh`` (biases folded in as an extra input column), no rotary, one softmax
  over the head-mean logit.
* ``shared_rope``: the same map, rotary-aware. Under rotary, dims ``f`` and ``f + d/2`` of a head
  form a complex number that turns with frequency f, so one frequency's logit summed over heads
  is ``Re(e^{i w_f (p - s)} x_p^T M_f x_s)`` with a complex ``M_f = sum_h c_hf conj(e_hf)^T`` of
  rank <= heads. Its SVD components keep frequency f; the R/2 largest over all frequencies give
  a rank-R ``q~, k~`` rotated with the layer's own (M-RoPE) tables. Exact at full rank.
* ``group_rope``: the same per KV group (one softmax per group, R / groups each).
* ``head_rope``: the same per query head (one softmax per head, R / heads each).

Every form is scored before (SVD) and after a calibration fit (Adam on the rank-space factors;
relative squared error of the score against S*; early stopping on held-out samples; reported on
further held-out samples): relative squared error and overlap of the 11% top-k with the
oracle's. FLOPs per layer are given relative to the layer, at the model's size and for
Qwen2.5-VL-7B at 4096 visual tokens, with the score computed by the fused two-pass op
(``causal_attention_received``: ``4 * pairs * width`` FLOPs, ``2 * pairs * softmaxes`` exps).

    python bench/alvts_selector_study.py --trained checkpoints/small_lvlm_cpu
    python bench/alvts_selector_study.py --quick          # fewer samples and steps (checks the script)

Writes ``bench/results/alvts_selector_study.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from token_prune import _ops, costmodel  # noqa: E402
from token_prune.models import adapter_for  # noqa: E402
from token_prune.reference import causal_attention_received_ref  # noqa: E402

KEEP = 0.11
QWEN_7B = costmodel.LMSpec(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                           vocab=152064, qkv_bias=True)
QWEN_7B_TOKENS = (4096, 34)  # the issue-6 setting: a 1792 px image, 14 + 20 text tokens


# ---------------------------------------------------------------------------
# models and samples
# ---------------------------------------------------------------------------


def random_qwen(hidden, heads, kv_heads, layers, logit_gain, seed=0):
    """A random-weight Qwen2.5-VL whose attention is not uniform: weights ~ N(0, 1/fan_in) (HF's
    0.02 leaves a narrow model's logits near 0), q/k scaled by ``logit_gain``."""
    from token_prune import tiny

    model = tiny.tiny_model("qwen2_5_vl", num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, vocab_size=256, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for name, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    gain = logit_gain if name.endswith(("q_proj", "k_proj")) else 1.0
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * gain / math.sqrt(mod.in_features))
                    if mod.bias is not None:
                        mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1 * gain)
    return model


def random_samples(model, n, image_px, seed):
    from token_prune import tiny

    return [tiny.make_inputs(model, [tiny.SampleSpec(images=((image_px, image_px),), prefix_len=14, suffix_len=20)],
                             seed=seed + i) for i in range(n)]


def trained_samples(path, n, batch):
    from token_prune.eval.small_lvlm import _to, load_small_lvlm
    from token_prune.eval.synthetic import make_sample

    model, _, proc, preset, _ = load_small_lvlm(path)
    cal = [make_sample(preset.task, 0, i, "val") for i in range(n)]
    batches = [_to(proc.batch(cal[i:i + batch], with_answer=False), "cpu") for i in range(0, n, batch)]
    return model, batches


def layer_inputs(model, adapter, inputs, layers):
    """{layer: (input hidden [B, S, H], cos, sin)} of the unpatched model's decoder layers."""
    seen, hooks = {}, []
    for li in layers:
        def pre(module, args, kwargs, li=li):
            x = args[0] if args else kwargs["hidden_states"]
            seen[li] = (x.detach(), *(t.detach() for t in kwargs["position_embeddings"]))
        hooks.append(adapter.lm.layers[li].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---------------------------------------------------------------------------
# selector forms
# ---------------------------------------------------------------------------


def augmented_weights(attn):
    """(W'_Q [heads*d, H+1], W'_K [kv*d, H+1]): weights with the bias as a last column."""
    out = []
    for proj in (attn.q_proj, attn.k_proj):
        w = proj.weight.detach().double()
        b = proj.bias.detach().double() if proj.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        out.append(torch.cat([w, b[:, None]], 1))
    return out


def rope_components(wq, wk, heads, kv_heads, d, groups):
    """Rotary-aware components of the logit maps, largest first, per group of query heads
    summed into one map: ``[(sigma, freq, u [H+1], w [H+1]) ...]`` with
    ``sum_h logit_h * sqrt(d) = sum Re(e^{i w_f (p - s)} (u^T x_p) conj(w^T x_s))``."""
    half = d // 2
    cq = torch.complex(wq.view(heads, d, -1)[:, :half], wq.view(heads, d, -1)[:, half:])  # [h, d/2, H+1]
    ck = torch.complex(wk.view(kv_heads, d, -1)[:, :half], wk.view(kv_heads, d, -1)[:, half:])
    rep = heads // kv_heads
    out = []
    for group in groups:
        comps = []
        for f in range(half):
            c = cq[group, f]  # rows c_h
            e = ck[[h // rep for h in group], f]
            # M_f = sum_h c_h conj(e_h)^T = C^T conj(E), through two thin QRs and a small SVD.
            qc, rc = torch.linalg.qr(c.T)
            qe, re = torch.linalg.qr(e.conj().T)
            u, sv, vh = torch.linalg.svd(rc @ re.T)
            left, right = qc @ u, qe.conj() @ vh.conj().T  # M_f = left diag(sv) right^H
            for r in range(sv.shape[0]):
                comps.append((float(sv[r]), f, sv[r].sqrt() * left[:, r], sv[r].sqrt() * right[:, r]))
        comps.sort(key=lambda t: -t[0])
        out.append(comps)
    return out


def rope_factors(components, rank):
    """Rank-space factors from :func:`rope_components`: ``rank`` real dims per group (even).
    Returns (P_q [G, H+1, r], P_k [G, H+1, r], freq [G, r/2] long); ``q~ = x' P_q`` dims j and
    r/2 + j are the real and imaginary part of a component turning with frequency ``freq[j]``."""
    pq, pk, fr = [], [], []
    for comps in components:
        top = comps[: rank // 2]
        a = torch.stack([t[2] for t in top], 1)  # [H+1, r/2]
        b = torch.stack([t[3] for t in top], 1)
        # x^T M y = sum (u^T x) conj(w^T y) for real y: q~ = u^T x, k~ = w^T y as (real, imaginary).
        pq.append(torch.cat([a.real, a.imag], 1))
        pk.append(torch.cat([b.real, b.imag], 1))
        fr.append(torch.tensor([t[1] for t in top]))
    return torch.stack(pq), torch.stack(pk), torch.stack(fr)


def norope_svd(wq, wk, heads, kv_heads, d):
    """SVD of the head-summed bilinear map ``sum_h W'_Qh^T W'_Kh`` (rotary ignored)."""
    rep = heads // kv_heads
    m = torch.einsum("hdi,hdj->ij", wq.view(heads, d, -1), wk.view(kv_heads, d, -1).repeat_interleave(rep, 0))
    return torch.linalg.svd(m)


def norope_factors(svd, rank):
    u, s, vh = svd
    root = s[:rank].sqrt()
    return (u[:, :rank] * root)[None], (vh[:rank].T * root)[None], None


def rotate(x, cos, sin, freq):
    """Rotary in rank space: x [B, G, S, r]; cos/sin [B, S, d] of the layer; freq [G, r/2]."""
    c = cos[:, :, freq].permute(0, 2, 1, 3)  # [B, G, S, r/2]
    s = sin[:, :, freq].permute(0, 2, 1, 3)
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    h = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s


def rank_qk(factors, xn, cos, sin):
    pq, pk, freq = factors
    x1 = torch.cat([xn, torch.ones_like(xn[..., :1])], -1)
    q = torch.einsum("bsi,gir->bgsr", x1, pq)
    k = torch.einsum("bsi,gir->bgsr", x1, pk)
    if freq is not None:
        q, k = rotate(q, cos, sin, freq), rotate(k, cos, sin, freq)
    return q, k


def score_of(q, k, visual, valid, scale, differentiable=False):
    if not differentiable:
        return _ops.alvts_score(q, k, visual, valid, scale=scale)
    rec = causal_attention_received_ref(q, k, visual, valid, scale)
    n_vis = (visual & valid).sum(1, keepdim=True).clamp(min=1).to(rec.dtype)
    n_txt = (~visual & valid).sum(1, keepdim=True).clamp(min=1).to(rec.dtype)
    return rec[:, 0] / n_vis * rec[:, 1] / n_txt


def rel_mse(got, oracle, mask):
    g, o = got[mask].double(), oracle[mask].double()
    return ((g - o) ** 2).mean() / (o ** 2).mean().clamp(min=1e-300)


def topk_overlap(got, oracle, visual, valid):
    hits = total = 0
    for b in range(got.shape[0]):
        m = visual[b] & valid[b]
        n = int(m.sum())
        if n == 0:
            continue
        k = max(1, math.ceil(KEEP * n - 1e-9))
        a = set(oracle[b][m].topk(k).indices.tolist())
        c = set(got[b][m].topk(k).indices.tolist())
        hits += len(a & c)
        total += k
    return hits / max(1, total)


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def form_cost(form, n, pairs, lm: costmodel.LMSpec, rank):
    """(selector FLOPs, exps) of one layer on n tokens with the fused two-pass score."""
    H, h, g, d = lm.hidden, lm.heads, lm.kv_heads, lm.head_dim
    if form == "full_width":
        proj = 2.0 * n * (2 * H * rank + rank * h * d + rank * g * d)
        return proj + 4.0 * pairs * h * d, 2.0 * pairs * h
    softmaxes = {"shared_norope": 1, "shared_rope": 1, "group_rope": g, "head_rope": h}[form]
    return 2.0 * n * 2 * (H + 1) * rank + 4.0 * pairs * rank, 2.0 * pairs * softmaxes


def cost_row(form, lm, n_vis, n_txt, rank):
    n = n_vis + n_txt
    pairs = n * (n + 1) / 2.0
    sel, exps = form_cost(form, n, pairs, lm, rank)
    layer = costmodel.lm_layer_cost(lm, n, pairs).flops
    return {"selector_flops": sel, "exps": exps, "layer_flops": layer, "fraction_of_layer": sel / layer}


# ---------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------


def build_forms(adapter, li, ranks):
    """{(form, total rank): ((P_q, P_k, freq), query heads per map)} of layer ``li``."""
    attn = adapter.lm.layers[li].self_attn
    h, g, d = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    wq, wk = augmented_weights(attn)
    rep = h // g
    svd = norope_svd(wq, wk, h, g, d)
    shared = rope_components(wq, wk, h, g, d, [list(range(h))])
    grouped = rope_components(wq, wk, h, g, d, [list(range(i * rep, (i + 1) * rep)) for i in range(g)])
    per_head = rope_components(wq, wk, h, g, d, [[i] for i in range(h)])
    forms = {}
    for r in ranks:
        forms[("shared_norope", r)] = (norope_factors(svd, r), h)
        forms[("shared_rope", r)] = (rope_factors(shared, r), h)
        if r % (2 * g) == 0 and g > 1:
            forms[("group_rope", r)] = (rope_factors(grouped, r // g), rep)
        if r % (2 * h) == 0:
            forms[("head_rope", r)] = (rope_factors(per_head, r // h), 1)
    # Full rank: per head it is the oracle itself (the exactness check); shared and per group it
    # isolates the error of one softmax over a sum of heads from the error of the truncation.
    forms[("head_rope", h * d)] = (rope_factors(per_head, d), 1)
    forms[("shared_rope", h * d)] = (rope_factors(shared, h * d), h)
    forms[("shared_norope", h * d)] = (norope_factors(svd, min(h * d, svd[1].shape[0])), h)
    if g > 1:
        forms[("group_rope", h * d)] = (rope_factors(grouped, rep * d), rep)
    return forms


def calibrate(factors, heads_per_map, d, data, train, val, steps, lr):
    """Adam on P_q, P_k (float64) against the oracle score; the best validation step is kept."""
    pq, pk, freq = factors
    params = [torch.nn.Parameter(pq.clone()), torch.nn.Parameter(pk.clone())]
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().abs().mean())} for p in params])
    scale = 1.0 / (math.sqrt(d) * heads_per_map)

    def loss(i, grad):
        xn, cos, sin, visual, valid, oracle = data[i]
        with torch.set_grad_enabled(grad):
            q, k = rank_qk((params[0], params[1], freq), xn, cos, sin)
            return rel_mse(score_of(q, k, visual, valid, scale, differentiable=grad), oracle, visual & valid)

    def val_loss():
        return sum(float(loss(i, False)) for i in val) / len(val)

    best = (val_loss(), [p.detach().clone() for p in params])
    for _ in range(steps):
        opt.zero_grad()
        for i in train:
            (loss(i, True) / len(train)).backward()
        opt.step()
        v = val_loss()
        if v < best[0]:
            best = (v, [p.detach().clone() for p in params])
    return (best[1][0], best[1][1], freq)


def evaluate(forms_scores, data, idx):
    """Mean rel MSE and top-k overlap over the samples ``idx`` for every form's score function."""
    out = {}
    for key, fn in forms_scores.items():
        r = o = 0.0
        for i in idx:
            xn, cos, sin, visual, valid, oracle = data[i]
            got = fn(i)
            r += float(rel_mse(got, oracle, visual & valid))
            o += topk_overlap(got, oracle, visual, valid)
        out[key] = {"rel_mse": r / len(idx), "topk_overlap": o / len(idx)}
    return out


def study_model(name, model, samples, layers, ranks, calib_ranks, steps, lr, log):
    from token_prune.methods.alvts_selector import FullWidthSelector

    model = model.double()
    samples = [{k: v.double() if v.is_floating_point() else v for k, v in s.items()} for s in samples]
    adapter = adapter_for(model)
    lm = adapter.lm
    spec = costmodel.LMSpec(layers=adapter.num_layers, hidden=adapter.hidden_size, heads=adapter.num_heads,
                            kv_heads=adapter.num_kv_heads, head_dim=adapter.head_dim,
                            intermediate=lm.layers[0].mlp.gate_proj.out_features, vocab=1,
                            qkv_bias=lm.layers[0].self_attn.q_proj.bias is not None)
    captured = [layer_inputs(model, adapter, s, layers) for s in samples]
    n_train = max(1, len(samples) // 2)
    n_val = max(1, (len(samples) - n_train) // 2)
    train, val, test = (list(range(n_train)), list(range(n_train, n_train + n_val)),
                        list(range(n_train + n_val, len(samples))))
    ids = [s["input_ids"] for s in samples]
    masks = [(s["attention_mask"].bool(), i == model.config.image_token_id) for s, i in zip(samples, ids)]
    n_vis = sum(int((v & m).sum()) for m, v in masks) / sum(int(m.shape[0]) for m, _ in masks)
    n_tok = sum(int(m.sum()) for m, _ in masks) / sum(int(m.shape[0]) for m, _ in masks)
    result = {"model": name, "hidden": adapter.hidden_size, "heads": adapter.num_heads,
              "kv_heads": adapter.num_kv_heads, "head_dim": adapter.head_dim, "samples": len(samples),
              "split": {"train": len(train), "val": len(val), "test": len(test)},
              "mean_visual_tokens": n_vis, "mean_prompt_tokens": n_tok, "layers": {}}
    d = adapter.head_dim
    for li in layers:
        t0 = time.perf_counter()
        data = []
        for cap, (valid, visual) in zip(captured, masks):
            x, cos, sin = cap[li]
            with torch.no_grad():
                q, k = adapter.project_qk(li, x, cos, sin)
                oracle = _ops.alvts_score(q, k, visual, valid)
                xn = lm.layers[li].input_layernorm(x)
            data.append((xn, cos, sin, visual, valid, oracle))
        forms = build_forms(adapter, li, ranks)
        # Exactness check of the rotary-aware construction: per head at full rank it is S* itself.
        full, _ = forms.pop(("head_rope", adapter.num_heads * d))
        xn, cos, sin, visual, valid, oracle = data[0]
        q, k = rank_qk(full, xn, cos, sin)
        err = float(rel_mse(score_of(q, k, visual, valid, 1 / math.sqrt(d)), oracle, visual & valid))
        assert err < 1e-20, f"rotary-aware factors at full rank differ from the oracle: {err}"
        result.setdefault("full_rank_check_rel_mse", []).append(err)

        fns = {}
        for (form, r), (fac, per_map) in forms.items():
            fns[(form, r, "svd")] = (lambda i, fac=fac, per_map=per_map:
                                     score_of(*rank_qk(fac, *data[i][:3]), *data[i][3:5], 1 / (math.sqrt(d) * per_map)))
        for r in ranks:
            sel = FullWidthSelector.from_weights(adapter, r, [li])
            fns[("full_width", r, "svd")] = (lambda i, sel=sel: score_of(
                *sel.qk(adapter, li, captured[i][li][0], *captured[i][li][1:]), *data[i][3:5], 1 / math.sqrt(d)))
        for (form, r), (fac, per_map) in forms.items():
            if r not in calib_ranks or not test:
                continue
            fit = calibrate(fac, per_map, d, data, train, val, steps, lr)
            fns[(form, r, "calibrated")] = (lambda i, fit=fit, per_map=per_map:
                                            score_of(*rank_qk(fit, *data[i][:3]), *data[i][3:5],
                                                     1 / (math.sqrt(d) * per_map)))
        with torch.no_grad():
            scores = evaluate(fns, data, test or val)
        rows = []
        for (form, r, stage), m in sorted(scores.items()):
            rows.append({"form": form, "rank": r, "stage": stage, **m,
                         "cost_here": cost_row(form, spec, round(n_vis), round(n_tok - n_vis), r)})
        result["layers"][str(li)] = rows
        log(f"{name} layer {li}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    return result


def summarize(results):
    lines = ["| model | form | R | stage | rel. sq. error (mean over layers) | top-11% overlap | "
             "selector / layer |", "|---|---|---:|---|---:|---:|---:|"]
    for res in results:
        agg = {}
        for rows in res["layers"].values():
            for r in rows:
                agg.setdefault((r["form"], r["rank"], r["stage"]), []).append(r)
        for (form, rank, stage), rs in sorted(agg.items()):
            mean = lambda key: sum(x[key] for x in rs) / len(rs)
            lines.append(f"| {res['model']} | {form} | {rank} | {stage} | {mean('rel_mse'):.3f} | "
                         f"{mean('topk_overlap'):.3f} | {rs[0]['cost_here']['fraction_of_layer']:.4f} |")
    return "\n".join(lines)


def qwen7b_prediction():
    """Per form and rank, at the issue-6 setting of Qwen2.5-VL-7B (bf16): the selector's FLOPs per
    layer over the layer's, and the ALVTS LM prefill (skipped="context") over the unpatched one at
    keep 0.11 and 1.0 with this selector in place of the cost model's current one."""
    from transformers import Qwen2_5_VLConfig

    cfg = json.loads((ROOT / "token_prune" / "configs" / "qwen2_5_vl_7b.json").read_text())["config"]
    arch = costmodel.arch_from_config(Qwen2_5_VLConfig(**cfg))
    visual, text = QWEN_7B_TOKENS
    base = costmodel.total(costmodel.lm_prefill_cost(arch, text, visual, "none")).flops
    rows = []
    for form in ("full_width", "shared_norope", "shared_rope", "group_rope", "head_rope"):
        for r in (64, 128, 256, 512):
            c = cost_row(form, arch.lm, visual, text, r)
            row = {"form": form, "rank": r, **c, "selector_over_lm": c["selector_flops"] * arch.lm.layers / base}
            for keep in (0.11, 1.0):
                stages = costmodel.lm_prefill_cost(arch, text, visual, "alvts", keep_ratio=keep)
                rest = costmodel.total(stages).flops - stages["select"].flops
                row[f"alvts_ratio_keep_{keep}"] = (rest + c["selector_flops"] * arch.lm.layers) / base
            rows.append(row)
    current = {keep: costmodel.total(costmodel.lm_prefill_cost(arch, text, visual, "alvts", keep_ratio=keep)).flops
               / base for keep in (0.11, 1.0)}
    return {"rows": rows, "current_cost_model": current,
            "floor_keep_0.11": costmodel.prefill_floor(arch.lm.layers, None, 0.11, method="alvts")}


def prediction_table(pred):
    lines = ["| form | R | selector / layer | selector / unpatched LM | ALVTS keep 0.11 | ALVTS keep 1.0 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in pred["rows"]:
        lines.append(f"| {r['form']} | {r['rank']} | {r['fraction_of_layer']:.4f} | {r['selector_over_lm']:.4f} | "
                     f"{r['alvts_ratio_keep_0.11']:.3f} | {r['alvts_ratio_keep_1.0']:.3f} |")
    cur = pred["current_cost_model"]
    lines.append(f"\nCurrent cost model (SDPA forward + backward selector): keep 0.11 {cur[0.11]:.3f}, "
                 f"keep 1.0 {cur[1.0]:.3f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trained", default=str(ROOT / "checkpoints" / "small_lvlm_cpu"),
                    help="a train-small-lvlm checkpoint (skipped when missing)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "alvts_selector_study.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes only, few steps (checks the script)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=["tiny", "trained", "mid"],
                    help="which models to study; results of the others already in --out are kept")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)
    t0 = time.perf_counter()
    results = []

    steps = args.steps or (5 if args.quick else 60)
    if "tiny" in args.models:
        tiny = random_qwen(64, 4, 2, 2, logit_gain=1.5, seed=0)
        results.append(study_model("tiny random (64 wide, 4/2 heads, d 16)", tiny,
                                   random_samples(tiny, 4 if args.quick else 8, 192, seed=0), [0, 1],
                                   ranks=[8, 16, 32], calib_ranks=[16], steps=steps, lr=0.02, log=log))
    if "trained" in args.models and Path(args.trained).is_dir():
        model, batches = trained_samples(args.trained, 16 if args.quick else 48, 8)
        results.append(study_model(f"trained small LVLM ({Path(args.trained).name})", model, batches,
                                   list(range(adapter_for(model).num_layers)), ranks=[8, 16, 32], calib_ranks=[16],
                                   steps=steps, lr=0.02, log=log))
    elif "trained" in args.models:
        log(f"no trained checkpoint at {args.trained}: skipped")
    if "mid" in args.models and not args.quick:
        mid = random_qwen(2048, 16, 2, 2, logit_gain=1.5, seed=0)
        results.append(study_model("mid random (2048 wide, 16/2 heads, d 128, Qwen2.5-VL-3B layer)", mid,
                                   random_samples(mid, 5, 512, seed=100), [0, 1], ranks=[64, 128, 256],
                                   calib_ranks=[128], steps=max(10, steps // 3), lr=0.02, log=log))
    out = Path(args.out)
    if out.is_file():
        names = {r["model"] for r in results}
        results = [r for r in json.loads(out.read_text())["results"] if r["model"] not in names] + results
    order = {"tiny": 0, "trained": 1, "mid": 2}
    results.sort(key=lambda r: order.get(r["model"].split()[0], 3))
    table = summarize(results)
    pred = qwen7b_prediction()
    table += "\n\nQwen2.5-VL-7B, 4096 visual + 34 text tokens (cost model FLOPs):\n\n" + prediction_table(pred)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"keep_ratio_for_overlap": KEEP, "qwen7b_tokens": {"visual": QWEN_7B_TOKENS[0], "text": QWEN_7B_TOKENS[1]},
            "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1), "quick": args.quick}
    out.write_text(json.dumps({"meta": meta, "results": results, "qwen7b": pred, "table": table}, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
