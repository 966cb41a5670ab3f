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


class masked_layers:
    """Context manager: the unpatched ``model`` with layer-wise visibility rules installed.

    While a layer's cache is empty (the prefill) it may attend to ``prefill_keys[l]`` of the
    prompt and rows in ``skip_rows[l]`` pass it unchanged; afterwards (decoding) it sees
    ``decode_keys[l]`` of the prompt and every token generated since. Tokens beyond the prompt
    are always visible; causality holds; every query sees at least itself. ``expand`` repeats
    each rule row that many times (generate's beam / return-sequence expansion).
    """

    def __init__(self, model, prompt_mask, prefill_keys, decode_keys, skip_rows=None, expand: int = 1):
        rep = (lambda rules: None if rules is None else [r.repeat_interleave(expand, 0) for r in rules])
        self.model = model
        self.valid = prompt_mask.bool().repeat_interleave(expand, 0)
        self.prefill, self.decode, self.skip = rep(prefill_keys), rep(decode_keys), rep(skip_rows)
        self.hooks = []

    def __enter__(self):
        B, S = self.valid.shape
        for li, layer in enumerate(_decoder_layers(self.model)):
            def pre(module, args, kwargs, li=li):
                hidden = args[0] if args else kwargs["hidden_states"]
                cache = hf.get_cache(kwargs)
                q = hidden.shape[1]
                past = hf.layer_length(cache, li)
                kv = past + q
                rule = self.prefill if past == 0 else self.decode
                keys = torch.ones(hidden.shape[0], kv, dtype=torch.bool, device=hidden.device)
                keys[:, :S] = rule[li].to(hidden.device) & self.valid.to(hidden.device)
                qpos = torch.arange(past, kv, device=hidden.device)[:, None]
                kpos = torch.arange(kv, device=hidden.device)[None, :]
                m = keys[:, None, :] & (kpos <= qpos)[None]
                m |= (kpos == qpos)[None]  # padding rows see themselves: no NaN rows
                if hf.attn_implementation(self.model.config) == "eager":
                    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
                    m = torch.where(m, zero, torch.finfo(hidden.dtype).min)
                kwargs["attention_mask"] = m[:, None]
                return args, kwargs

            self.hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            if self.skip is not None:
                def post(module, args, kwargs, output, li=li):
                    hidden_in = args[0] if args else kwargs["hidden_states"]
                    if hf.layer_length(hf.get_cache(kwargs), li) > hidden_in.shape[1]:
                        return None  # decoding: every new token goes through every layer
                    out = output[0] if isinstance(output, tuple) else output
                    out = torch.where(self.skip[li][..., None].to(out.device), hidden_in, out)
                    return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

                self.hooks.append(layer.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        return False


class deepstack_rows:
    """Context manager: the unpatched ``model``'s deepstack inputs replaced by ``edit(layer,
    rows [N, H], visual [B, S]) -> rows`` at every prefill (the rows the model adds to its N visual
    tokens after decoder layer ``layer``). Tests use it to build the oracles a wrong deepstack
    handling would match (features dropped after pruning, or withheld from skipped tokens)."""

    def __init__(self, model, edit):
        self.model, self.edit, self.hook = model, edit, None

    def __enter__(self):
        def pre(module, args, kwargs):
            rows, visual = kwargs.get(hf.DEEPSTACK_ARGS[1]), kwargs.get(hf.DEEPSTACK_ARGS[0])
            if rows is not None:
                kwargs[hf.DEEPSTACK_ARGS[1]] = [self.edit(li, r.clone(), visual) for li, r in enumerate(rows)]
            return args, kwargs

        self.hook = self.model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        return False


def masked_generate(model, inputs, steps, prefill_keys, decode_keys, skip_rows=None, decode_position=None,
                    prefill_position=None, forced=None):
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
        forced: [B, F] tokens fed (teacher-forced) after the first generated token, before greedy
            decoding goes on (a second turn of a conversation), or None.

    Returns:
        (tokens [B, steps], logits of the first new token [B, vocab]); with ``forced``, tokens are
        the first token, the forced ones and then ``steps - 1`` greedy ones.
    """
    B, S = inputs["attention_mask"].shape
    with torch.no_grad(), masked_layers(model, inputs["attention_mask"], prefill_keys, decode_keys, skip_rows):
        extra = {}
        if prefill_position is not None:
            extra["position_ids"] = prefill_position(model, inputs["attention_mask"])
        out = model(**inputs, use_cache=True, **extra)
        cache = hf.output_cache(out)
        first = out.logits[:, -1]
        tokens = [first.argmax(-1)]
        feed = [] if forced is None else list(forced.unbind(1))
        mask = inputs["attention_mask"]
        for step in range(steps - 1 + len(feed)):
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True,
                        position_ids=decode_position(model, mask), **hf.cache_kwargs(model, cache))
            tokens.append(feed[step] if step < len(feed) else out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), first


def masked_forward(model, inputs, prefill_keys, skip_rows=None, prefill_position=None, **kwargs):
    """One forward of the unpatched ``model`` with the prefill rules (gradients allowed); the
    model's output object (``labels`` in ``kwargs`` give its loss)."""
    extra = {}
    if prefill_position is not None:
        extra["position_ids"] = prefill_position(model, inputs["attention_mask"])
    with masked_layers(model, inputs["attention_mask"], prefill_keys, prefill_keys, skip_rows):
        return model(**inputs, use_cache=False, **extra, **kwargs)


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
