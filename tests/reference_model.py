"""An independent oracle for every pruning method: the *unpatched* HF model, run on the full
sequence, with per-layer attention masks (forward pre-hooks) that hide the tokens a layer must
not see, and forward hooks that make skipped rows pass through a layer unchanged.

None of the package's compaction, cache surgery, position or mask handling is used here, so
agreement with the patched model is a real check of all of them.
"""

from __future__ import annotations

import torch

from token_prune import hf


def _decoder_layers(model):
    return model.model.language_model.layers


def masked_generate(model, inputs, steps, prefill_keys, decode_keys, skip_rows=None, decode_position=None,
                    prefill_position=None):
    """Greedy decode of the unpatched ``model`` with layer-wise visibility rules.

    Args:
        inputs: processor-style inputs (left padded).
        steps: tokens to generate.
        prefill_keys: per decoder layer, [B, S] bool prompt tokens that layer may attend to
            during the prefill.
        decode_keys: per decoder layer, [B, S] bool prompt tokens that layer's cache keeps for
            decoding.
        skip_rows: per decoder layer, [B, S] bool rows whose hidden state must pass through that
            layer unchanged during the prefill (ALVTS), or None.
        decode_position: fn(model, mask [B, S+t]) -> position_ids for one new token; HF derives
            wrong decode positions from a 2D mask outside generate, so the caller supplies them.
        prefill_position: fn(model, mask [B, S]) -> prompt position_ids as ``generate`` passes
            them, or None to let the model derive them (HF's Llama ignores left padding then,
            which would not match generate's numbering).

    Returns:
        (tokens [B, steps], logits of the first new token [B, vocab]).
    """
    layers = _decoder_layers(model)
    valid = inputs["attention_mask"].bool()
    B, S = valid.shape
    phase = ["prefill"]
    hooks = []
    for li, layer in enumerate(layers):
        def pre(module, args, kwargs, li=li):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache = hf.get_cache(kwargs)
            q = hidden.shape[1]
            past = hf.layer_length(cache, li)
            kv = past + q
            rule = prefill_keys if phase[0] == "prefill" else decode_keys
            keys = torch.ones(B, kv, dtype=torch.bool, device=hidden.device)
            keys[:, :S] = rule[li] & valid
            qpos = torch.arange(past, kv, device=hidden.device)[:, None]
            kpos = torch.arange(kv, device=hidden.device)[None, :]
            m = keys[:, None, :] & (kpos <= qpos)[None]
            m |= (kpos == qpos)[None]  # padding rows see themselves: no NaN rows
            impl = hf.attn_implementation(model.config)
            if impl == "eager":
                zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                m = torch.where(m, zero, torch.finfo(hidden.dtype).min)
            kwargs["attention_mask"] = m[:, None]
            return args, kwargs

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        if skip_rows is not None:
            def post(module, args, kwargs, output, li=li):
                if phase[0] != "prefill":
                    return None
                hidden_in = args[0] if args else kwargs["hidden_states"]
                out = output[0] if isinstance(output, tuple) else output
                out = torch.where(skip_rows[li][..., None], hidden_in, out)
                return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

            hooks.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            extra = {}
            if prefill_position is not None:
                extra["position_ids"] = prefill_position(model, inputs["attention_mask"])
            out = model(**inputs, use_cache=True, **extra)
            cache = hf.output_cache(out)
            first = out.logits[:, -1]
            tokens = [first.argmax(-1)]
            mask = inputs["attention_mask"]
            phase[0] = "decode"
            for _ in range(steps - 1):
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = model(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True,
                            position_ids=decode_position(model, mask), **hf.cache_kwargs(model, cache))
                tokens.append(out.logits[:, -1].argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(tokens, 1), first


def qwen_decode_position(model, mask):
    """Positions [4, B, 1] of the next token of a Qwen2.5-VL prompt, as generate computes them."""
    text = mask.sum(1, keepdim=True) - 1
    pos = (text + hf.rope_deltas(model.model))[None].expand(3, -1, -1)
    return torch.cat([text[None], pos], 0)


def llama_prefill_position(model, mask):
    """Prompt positions [B, S] as generate numbers them: real tokens from 0, padding at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def llama_decode_position(model, mask):
    """Positions [B, 1] of the next token of a LLaVA prompt (mask cumsum, as generate does)."""
    return mask.sum(1, keepdim=True) - 1
