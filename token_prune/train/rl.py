"""GlimpsePrune+: reinforcement learning of the language model while it runs pruned (stage 2).

    import token_prune
    res = token_prune.train_rl(model, rows, vip="vip/", processor=proc, out_dir="rl/", steps=300)
    model = token_prune.load_rl_adapters(model, "rl/")         # a PeftModel with the trained LoRA
    token_prune.patch(model, method="glimpse", vip="vip/")     # then ordinary generate

What runs
---------
The model is patched with GlimpsePrune (the given, frozen VIP) for the whole run, and LoRA
adapters (PEFT, rank 32 on every linear layer of the language model: q/k/v/o and the MLP) are the
only trainable weights. The loop is TRL's ``GRPOTrainer``: per prompt ``num_generations`` (4)
sampled rollouts, a reward per rollout, advantages normalised within each group, the clipped
policy-gradient loss and a k3 KL penalty (``beta`` 0.04) to the reference. The reference is the
same model with its adapters switched off (TRL does that for a PEFT model), still pruned: the
GlimpsePrune model of stage 1. Rewards are plain functions (TRL's signature, ``fn(prompts,
completions, **columns) -> list[float]``); built in are :func:`exact_match_reward`,
:func:`normalised_match_reward` and a keep-ratio term (``keep_ratio_weight``: ``-w * kept share``
of each rollout's visual tokens). The public recipe's reward is a judge model with no prune-ratio
term, so the keep-ratio weight defaults to 0.

Three things differ from running ``GRPOTrainer`` on an unpruned model, each in a small override of
:class:`PrunedGRPOTrainer`:

* **Log-probabilities: two forwards, not one.** TRL scores completions with one forward over
  ``prompt + completion``. On a pruned model that would append the glimpse token after the
  completion and let the VIP see the answer, so the keep decision would differ from the one made
  while generating. :func:`completion_logits` instead runs the prompt as a prefill (the glimpse
  token, the VIP, the compaction after layer K, exactly as in ``generate``) and then the completion
  tokens in one more forward on the pruned KV cache, with generate's positions. The result equals
  the sampling distribution of the rollouts (tested) and the unpruned model's single forward when
  everything is kept (tested). Gradients flow through the compaction into layers 0..K through the
  hidden states and the compacted KV cache (``compact_tokens`` has an autograd formula; the LoRA
  gradients equal those of a float64 masked oracle, tested).
* **Several rollouts per prompt.** GlimpsePrune refuses ``num_return_sequences > 1`` (the image
  features would not match the expanded prompts). TRL never asks for it: its sampler repeats each
  prompt ``num_generations`` times in the batch and ``generate`` samples each row once, which the
  patched model supports as any batch.
* **Keep ratio per rollout.** The prune statistics of each rollout's prefill are read from the
  patch handle right after ``generate`` and passed to the reward functions as the ``keep_ratio``
  column and logged as a metric.

Logs: every step's reward, KL, keep ratio (and TRL's other metrics) go to ``out_dir/rl_log.jsonl``
and, at the end, a plot ``out_dir/rl_log.png``. Checkpoints are TRL/Trainer checkpoints
(``checkpoint-<step>/`` with ``adapter_model.safetensors``, optimizer and RNG state);
``resume=True`` continues from the newest; the final adapters go to ``out_dir`` itself.

The synthetic benchmark's small model has no Hugging Face processor; :func:`small_lvlm_processor`
builds a real ``Qwen2_5_VLProcessor`` (word-level fast tokenizer, PIL image processor, a chat
template giving the benchmark's prompt) whose output equals :class:`~token_prune.accuracy.SmallVLMProcessor`'s
token for token and pixel for pixel (tested), so TRL drives it as any VLM.

trl and peft are optional (``pip install token_prune[rl]``); this module imports them only
inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .. import hf
from ..api import get_handle, hf_model, patch

__all__ = ["train_rl", "RLResult", "completion_logits", "exact_match_reward", "normalised_match_reward",
           "keep_ratio_reward", "load_rl_adapters", "lora_config", "small_lvlm_processor", "LLM_LINEARS"]

#: every linear layer of the language model's decoder blocks (never the vision tower or the head)
LLM_LINEARS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LOG_FILE = "rl_log.jsonl"


def _need_rl_extra():
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise ImportError(f"token_prune.train_rl needs trl and peft ({e}); install them with "
                          "`pip install token_prune[rl]`") from None


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    from ..eval.synthetic import WordTokenizer

    return WordTokenizer.normalize(text)


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding white space, is the answer, else 0.0."""
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def normalised_match_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion and the answer are the same words (lower case, punctuation split
    off, white space collapsed: the synthetic benchmark's exact-match rule), else 0.0."""
    return [float(_normalise(_text(c)) == _normalise(str(a))) for c, a in zip(completions, answer)]


def keep_ratio_reward(weight: float):
    """A reward term ``-weight * keep_ratio``: the share of each rollout's visual tokens the VIP kept
    (1.0 for a rollout whose prompt had no image or when unpruned)."""
    def keep_ratio_term(completions, keep_ratio=None, **kwargs):
        ratios = keep_ratio if keep_ratio is not None else [1.0] * len(completions)
        return [-weight * float(r) for r in ratios]

    keep_ratio_term.__name__ = "keep_ratio_term"
    return keep_ratio_term


def _text(completion) -> str:
    # TRL passes strings for plain prompts and message lists for conversational ones.
    if isinstance(completion, list):
        return "".join(m["content"] if isinstance(m["content"], str) else "" for m in completion)
    return completion


# --------------------------------------------------------------------------------------------
# The pruned forward that scores completions
# --------------------------------------------------------------------------------------------


def _prompt_positions(model, mask: torch.Tensor):
    """Prompt positions as ``generate`` numbers them, when the model would number them otherwise
    (1D RoPE: real tokens from 0, padding 0). None for Qwen-VL, whose forward derives its M-RoPE
    positions from the mask and the image grids itself."""
    if model.config.model_type.startswith("qwen"):
        return None
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def continuation_positions(model, mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Positions of the last ``q_len`` columns of ``mask`` [B, P + q_len] (prompt then new tokens),
    continuing the prompt's numbering as ``generate`` does: real tokens counted from 0, plus the
    M-RoPE offset Qwen-VL cached at the prefill. Returns [4, B, q] (Qwen-VL) or [B, q]."""
    text = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q_len:]
    if not model.config.model_type.startswith("qwen"):
        return text
    deltas = hf.rope_deltas(model.model)
    pos = text if deltas is None else text + deltas.to(text.device)
    return torch.cat([text[None], pos[None].expand(3, -1, -1)], 0)


def completion_logits(model, prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Next-token logits for every completion token, through the (possibly pruned) prefill.

    Args:
        model: the model (a PEFT wrapper is fine), patched or not.
        prompt: the prompt's model inputs, left padded: ``input_ids`` / ``attention_mask`` [B, P]
            and the image inputs (``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` ...).
        completion_ids: [B, C] sampled tokens, right padded.
        completion_mask: [B, C] 1 for real completion tokens.

    Returns:
        [B, C, V] logits; row ``t`` predicts ``completion_ids[:, t]``. Differentiable.

    The prompt runs as a prefill (pruned when the model is patched, as in ``generate``); the
    completion tokens but the last run in one more forward on its KV cache, with the positions
    ``generate`` would give them.
    """
    base = hf_model(model)
    mask = prompt["attention_mask"]
    kwargs = dict(prompt)
    pos = _prompt_positions(base, mask)
    if pos is not None:
        kwargs["position_ids"] = pos
    out = model(**kwargs, use_cache=True)
    logits = [out.logits[:, -1:]]
    C = completion_ids.shape[1]
    if C > 1:
        full = torch.cat([mask, completion_mask[:, :-1].to(mask.dtype)], 1)
        cache = hf.output_cache(out)
        out2 = model(input_ids=completion_ids[:, :-1], attention_mask=full, use_cache=True,
                     position_ids=continuation_positions(base, full, C - 1), **hf.cache_kwargs(base, cache))
        logits.append(out2.logits)
    return torch.cat(logits, 1)


def _split_images(kwargs: dict, num_images, start: int, end: int) -> dict:
    """The image inputs of samples ``start:end`` (pixel rows per image from ``image_grid_thw``
    for Qwen-VL, one ``pixel_values`` entry per image otherwise)."""
    out = {}
    pv = kwargs.get("pixel_values")
    if pv is None:
        return out
    counts = num_images if num_images is not None else [1] * (end - start)
    first, last = sum(counts[:start]), sum(counts[:end])
    grid = kwargs.get("image_grid_thw")
    if grid is not None:
        rows = grid.prod(-1).tolist()
        out["pixel_values"] = pv[sum(rows[:first]):sum(rows[:last])]
        out["image_grid_thw"] = grid[first:last]
    else:
        out["pixel_values"] = pv[first:last]
    if kwargs.get("image_sizes") is not None:
        out["image_sizes"] = kwargs["image_sizes"][first:last]
    return out


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def _trainer_class():
    from trl import GRPOTrainer

    class PrunedGRPOTrainer(GRPOTrainer):
        """TRL's GRPO trainer on a model patched by token_prune (see the module docstring)."""

        _UNSUPPORTED = ("pixel_attention_mask", "spatial_shapes", "num_tiles", "image_position_ids",
                        "token_type_ids")

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            out = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            handle = get_handle(self.model)
            stats = handle.stats if handle is not None else []
            self._rollout_keep = ([s["keep_ratio"] for s in stats] if len(stats) == len(prompt_ids)
                                  else [1.0] * len(prompt_ids))
            return out

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            keep = getattr(self, "_rollout_keep", None) or [1.0] * len(inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["keep_ratio"].append(sum(keep) / len(keep))
            inputs = [dict(x, keep_ratio=k) for x, k in zip(inputs, keep)]
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               num_images=None, mm_token_type_ids=None, **images):
            bad = [k for k in self._UNSUPPORTED if images.get(k) is not None]
            if bad or compute_aux_loss:
                raise NotImplementedError(f"token_prune.train_rl: inputs {bad or ['aux loss']} are not supported")
            n = input_ids.shape[0]
            batch_size = batch_size or n
            P = input_ids.shape[1] - logits_to_keep
            logps, entropies = [], []
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                prompt = dict(input_ids=input_ids[start:end, :P], attention_mask=attention_mask[start:end, :P],
                              **_split_images(images, num_images, start, end))
                if mm_token_type_ids is not None:
                    prompt["mm_token_type_ids"] = mm_token_type_ids[start:end, :P]
                comp = input_ids[start:end, P:]
                with self.accelerator.autocast():
                    logits = completion_logits(model, prompt, comp, attention_mask[start:end, P:])
                logp_all = (logits.float() / self.temperature).log_softmax(-1)
                logps.append(logp_all.gather(-1, comp[..., None]).squeeze(-1))
                if compute_entropy:
                    entropies.append(-(logp_all.exp() * logp_all).sum(-1))
            return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    return PrunedGRPOTrainer


def _log_callback(path: str):
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Appends every logged step's metrics to a JSON-lines file."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero and "reward" in logs:
                with open(path, "a") as f:
                    f.write(json.dumps(dict(step=state.global_step, **logs)) + "\n")

    return StepLog()


def _time_limit(minutes: float | None):
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        """Stops training (with a final checkpoint) once ``minutes`` of wall time have passed."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if minutes is not None and time.perf_counter() - self.start > 60 * minutes:
                control.should_training_stop = True
                control.should_save = True

    return TimeLimit()


def lora_config(rank: int = 32, alpha: int | None = None, dropout: float = 0.0, target_modules: str = LLM_LINEARS):
    """PEFT ``LoraConfig`` for the language model's linears (alpha defaults to 2 * rank).

    Dropout defaults to 0: with dropout the policy that scores a rollout in the update would not be
    the one that sampled it."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=target_modules,
                      bias="none")


def load_rl_adapters(model, path, trainable: bool = False):
    """``model`` wrapped by PEFT with the LoRA adapters ``train_rl`` saved in ``path``. Patch the
    result (``token_prune.patch(peft_model, ...)``), or ``merge_and_unload()`` it first."""
    _need_rl_extra()
    from peft import PeftModel

    return PeftModel.from_pretrained(model, os.fspath(path), is_trainable=trainable)


@dataclass
class RLResult:
    """What :func:`train_rl` returns.

    Attributes:
        model: the ``PeftModel`` with the trained adapters (unpatched again).
        out_dir: where the final adapters, the log and the plot are.
        log: one dict per logged step (``reward``, ``kl``, ``keep_ratio``, ...).
        step: optimizer steps done in total.
        elapsed_s: wall time of this call.
        resumed_from: the checkpoint resumed from, or None.
    """

    model: object
    out_dir: str
    log: list[dict] = field(default_factory=list)
    step: int = 0
    elapsed_s: float = 0.0
    resumed_from: str | None = None


def _rows(data) -> list[dict]:
    """``{"prompt", "image", "answer"}`` rows (conversational prompt, PIL image) from a JSONL path,
    row dicts / :class:`~token_prune.data.VipRow` (image paths) or objects with ``image`` (PIL),
    ``question`` and ``answer`` (the synthetic benchmark's samples)."""
    from ..data import _open_image, as_dataset

    if isinstance(data, (list, tuple)) and data and hasattr(data[0], "image") and not isinstance(data[0].image, str):
        items = [(s.image, s.question, s.answer) for s in data]
    else:
        items = [(_open_image(r), r.question, r.answer) for r in as_dataset(data)]
    return [{"prompt": [{"role": "user", "content": q}], "image": im.convert("RGB"), "answer": a} for im, q, a in items]


def train_rl(model, data, *, vip, processor, out_dir, steps: int = 200, prompts_per_step: int = 4,
             num_generations: int = 4, lr: float = 1e-4, beta: float = 0.04, lora_rank: int = 32,
             lora_alpha: int | None = None, temperature: float = 1.0, max_new_tokens: int = 8,
             rewards=None, keep_ratio_weight: float = 0.0, prune: bool = True, prune_options: dict | None = None,
             loss_type: str = "grpo", epsilon: float = 0.2, warmup_ratio: float = 0.0, max_grad_norm: float = 1.0,
             save_every: int | None = None, keep_checkpoints: int | None = 2, resume: bool = False,
             bf16: bool | None = None, seed: int = 0, max_minutes: float | None = None, progress: bool = True,
             plot: bool = True) -> RLResult:
    """GRPO fine-tuning of the language model through LoRA while the model runs pruned.

    Args:
        model: a supported HF vision-language model (unpatched, no adapters). Its weights are never
            changed, only the LoRA adapters train; PEFT injects the adapter layers into this object
            (``result.model.unload()`` takes them out again).
        data: training rows: a JSONL path or a list of ``{image, question, answer}`` rows (image
            paths), or objects with a PIL ``image`` (e.g. ``token_prune.synthetic`` samples).
        vip: the trained, frozen GlimpsePrune VIP (a directory or ``GlimpseModules``).
        processor: the model's Hugging Face processor (``ProcessorMixin`` with a chat template); for
            the synthetic benchmark's small model, :func:`small_lvlm_processor`.
        out_dir: checkpoints, the final adapters, ``rl_log.jsonl`` and ``rl_log.png``.
        steps: optimizer steps; each takes ``prompts_per_step`` prompts x ``num_generations`` rollouts.
        lr, beta, epsilon, loss_type: AdamW learning rate, KL weight (k3 estimator), PPO clip range,
            TRL's loss aggregation ("grpo": per-sequence mean).
        warmup_ratio, max_grad_norm: linear warm-up over this share of the steps, then a constant
            learning rate; gradient clipping.
        lora_rank, lora_alpha: adapters on every linear of the language model (:data:`LLM_LINEARS`).
        temperature, max_new_tokens: rollout sampling.
        rewards: reward functions (TRL signature); default ``[normalised_match_reward]``.
        keep_ratio_weight: adds ``keep_ratio_reward(weight)`` when > 0.
        prune: False trains the same way on the unpruned model (the control that separates the
            effect of RL from that of pruning).
        prune_options: more ``patch`` options (``threshold``, ``max_keep_ratio``, ``layer`` ...).
        save_every, keep_checkpoints, resume: Trainer checkpoints (``checkpoint-<step>/``).
        bf16: bf16 autocast (default: on with CUDA).
        max_minutes: stop after the step during which this much wall time has passed (for machines
            with a per-command time limit); the adapters and a checkpoint are saved as usual.
        progress: the Trainer's progress bar.
        plot: write ``rl_log.png`` (needs matplotlib; skipped without it).

    Returns:
        An :class:`RLResult`; the model comes back unpatched, wrapped by PEFT.
    """
    _need_rl_extra()
    from peft import get_peft_model
    from trl import GRPOConfig

    if get_handle(model) is not None:
        raise ValueError("the model is patched; train_rl patches it itself (call token_prune.unpatch(model) first)")
    if type(model).__module__.split(".")[0] == "peft":
        raise ValueError("the model already has PEFT adapters; pass the base model (or merge_and_unload() first)")
    for name, v in (("steps", steps), ("prompts_per_step", prompts_per_step), ("lora_rank", lora_rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations must be an int >= 2 (group-normalised advantages), got {num_generations!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, LOG_FILE)
    resume_from = _latest_checkpoint(out_dir) if resume else None
    if not resume and os.path.exists(log_path):
        os.remove(log_path)
    rows = _rows(data)
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    cuda = next(model.parameters()).is_cuda
    bf16 = cuda if bf16 is None else (bf16 and cuda)
    reward_funcs = list(rewards) if rewards else [normalised_match_reward]
    if keep_ratio_weight:
        reward_funcs.append(keep_ratio_reward(keep_ratio_weight))
    args = GRPOConfig(
        output_dir=out_dir, max_steps=steps, learning_rate=lr, beta=beta, epsilon=epsilon, loss_type=loss_type,
        num_generations=num_generations, per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=1, max_completion_length=max_new_tokens, temperature=temperature,
        warmup_steps=warmup_ratio, max_grad_norm=max_grad_norm, lr_scheduler_type="constant_with_warmup",
        logging_steps=1, save_strategy="steps", save_steps=save_every or steps, save_total_limit=keep_checkpoints,
        report_to="none", seed=seed, data_seed=seed, bf16=bf16, fp16=False, use_cpu=not cuda,
        disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
        top_k=0, top_p=1.0, mask_truncated_completions=False, log_completions=False,
        # TRL turns it on by default; HF's checkpointed layers then drop the KV cache, which the
        # pruned scoring forward needs (the completion runs on the prompt's pruned cache).
        gradient_checkpointing=False,
    )
    peft_model = get_peft_model(model, lora_config(lora_rank, lora_alpha))
    handle = patch(peft_model, method="glimpse", vip=vip, **(prune_options or {})) if prune else None
    t0 = time.perf_counter()
    try:
        trainer = _trainer_class()(model=peft_model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                   processing_class=processor,
                                   callbacks=[_log_callback(log_path), _time_limit(max_minutes)])
        trainer.train(resume_from_checkpoint=resume_from)
        peft_model.save_pretrained(out_dir)
        step = trainer.state.global_step
    finally:
        if handle is not None:
            handle.remove()
    log = read_log(out_dir)
    if plot:
        plot_log(log, os.path.join(out_dir, "rl_log.png"))
    return RLResult(model=peft_model, out_dir=out_dir, log=log, step=step, elapsed_s=time.perf_counter() - t0,
                    resumed_from=resume_from)


def _latest_checkpoint(out_dir: str) -> str | None:
    found = []
    for name in os.listdir(out_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            found.append((int(name[len("checkpoint-"):]), os.path.join(out_dir, name)))
    return max(found)[1] if found else None


def read_log(out_dir) -> list[dict]:
    """The per-step records ``train_rl`` wrote to ``out_dir/rl_log.jsonl`` (last record per step)."""
    path = os.path.join(os.fspath(out_dir), LOG_FILE)
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_log(log: list[dict], path: str, window: int = 10) -> str | None:
    """Reward, KL and keep ratio per step (a running mean over ``window`` steps drawn on top)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in ("reward", "kl", "keep_ratio") if any(k in r for r in log)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in log if k in r and r[k] is not None and math.isfinite(r[k])]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, lw=0.8, alpha=0.4)
        w = max(1, min(window, len(ys)))
        run = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, run, lw=1.6)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# A Hugging Face processor for the synthetic benchmark's small model
# --------------------------------------------------------------------------------------------

_SPECIAL_NAMES = {"<vision_start>": "<|vision_start|>", "<vision_end>": "<|vision_end|>",
                  "<image>": "<|image_pad|>", "<video>": "<|video_pad|>"}
_CHAT_TEMPLATE = (
    "{%- for m in messages -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


def small_lvlm_processor(tokenizer, config):
    """A ``Qwen2_5_VLProcessor`` for the small model of :mod:`token_prune.accuracy`.

    Args:
        tokenizer: its :class:`~token_prune.synthetic.WordTokenizer`.
        config: the model's ``Qwen2_5_VLConfig`` (patch and merge sizes).

    The fast tokenizer is word-level over the same ids (the special tokens under Qwen's names), the
    image processor is the PIL one without resizing and with mean = std = 0.5 (so pixels map to
    ``x / 127.5 - 1`` like the benchmark's own), and the chat template renders a user message with
    an image as ``<vision_start> <image>*N <vision_end> question``. Image-only: a video processor
    would need torchvision.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from ..eval.synthetic import _WORD, SPECIAL_TOKENS

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    vocab = {_SPECIAL_NAMES.get(t, t): i for i, t in enumerate(tokenizer.tokens)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")])
    tk.add_special_tokens([AddedToken(_SPECIAL_NAMES.get(t, t), special=True, normalized=False)
                           for t in SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")
    vc = config.vision_config
    images = Qwen2VLImageProcessorPil(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                                      merge_size=vc.spatial_merge_size)
    return ImageOnlyQwen2_5_VLProcessor(image_processor=images, tokenizer=fast, chat_template=_CHAT_TEMPLATE)
