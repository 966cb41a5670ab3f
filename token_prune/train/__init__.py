"""GlimpsePrune stage 1: train the glimpse embeddings and the VIP of a frozen LVLM, at any layer K.

Only :class:`~token_prune.vip.GlimpseModules` train (glimpse vectors, their projection and norm,
the VIP); every base-model weight is frozen and stays bit-identical.

Objectives (weights combine freely)
-----------------------------------
* ``kl`` (needs no annotations): KL(full model || soft-pruned model) on the answer tokens,
  teacher-forced (prompt + answer in one sequence, loss on the answer positions only). The
  teacher is the unpatched model.
* ``sparsity``: pulls the keep fraction toward ``target_keep`` (see "Keep probabilities").
* ``ce``: answer cross-entropy of the soft-pruned model.
* ``dice`` / ``bce``: Dice and binary cross-entropy of the VIP logits against box masks
  rasterised onto each image's token grid (rows without boxes do not count). The public recipe
  is ``ce`` + 1.0 Dice + 0.1 BCE.

``objective="kl"`` (default) is ``kl=1, sparsity=1``; ``"mask"`` is ``ce=1, dice=1, bce=0.1``;
``"kl+mask"`` is ``kl=1, sparsity=1, dice=1, bce=0.1``. Explicit ``*_weight`` arguments override.

The soft-pruned student
-----------------------
Hard pruning at inference does three things: layers ``0..K`` run on the whole prompt plus the
glimpse token; the VIP keeps a subset of the visual tokens; from then on *every* later
computation sees only the kept ones: the prompt in layers ``K+1..``, and the answer tokens
(decoded later) in *all* layers, because the caches of layers ``0..K`` are compacted too. The
student relaxes the keep decision to a probability ``p_i`` and reproduces that structure with an
additive attention bias ``log p_i`` (clamped at ``bias_floor``) on each visual key i:

1. Pass 1 (layers ``0..K-1``, then layer K's q/k): the prompt plus the glimpse token appended at
   the end of the row (rotary position ``last prompt position + 1``, the per-layer glimpse
   vector added before each layer, answer tokens hidden from it), exactly as the inference
   prefill does. The glimpse attention map at K and the ViT features give the VIP logits.
2. Pass 2 (all layers, no glimpse token, a custom float 4D mask per layer): in layers ``0..K``
   prompt queries see every token (bias 0) and *answer* queries get the ``log p`` bias on visual
   keys; in layers ``K+1..`` every query gets it. Text keys always get bias 0.

With ``p`` in {0, 1} this is exactly the hard-pruned model (checked in the tests against the
real pruned path), so the loss is measured on the structure that runs at inference. Pass 2
recomputes the prompt rows of layers ``0..K`` (they do not depend on ``p``): one extra ``K/L``
partial forward, with no backward through the prompt rows.

Keep probabilities
------------------
``normalise_keep=True`` (default): per image, the VIP logits are standardised (zero mean, unit
spread), divided by ``temperature`` (0.25) and shifted by the c that makes their mean sigmoid
exactly ``target_keep`` (solved by bisection, with the implicit-function gradient of c):
``p_i = sigmoid(z_i / temperature + c)``. The distillation loss then only shapes the *ranking*
within each image, at exactly the budget the threshold rule will keep, with near-binary keep
probabilities; a plain ``sigmoid(logit)`` with a squared sparsity penalty lets uniform soft
down-weighting of every visual token (much gentler than dropping most of them) pass for a good
mask and trains the ranking poorly. The keep *threshold* is calibrated apart from the gradient:
after every optimizer step the VIP's output bias moves by ``calibration_momentum`` (0.2) times
the shift that makes ``sigmoid(logit) > 0.5`` keep ``target_keep`` of the batch's visual tokens,
so the threshold rule at inference keeps about ``target_keep`` (the role of the sparsity term).
Box losses calibrate the logits themselves, so this is off when they are on.
``normalise_keep=False`` is the literal relaxation: ``p = sigmoid(logit / temperature)`` plus
``sparsity_weight * mean_images (mean p - target_keep)^2``.

Training loop: AdamW, linear warmup + cosine decay, gradient accumulation, bf16 autocast on
CUDA, optional activation checkpointing of every decoder-layer call, periodic checkpoints
(``GlimpseModules.save`` format plus ``trainer_state.pt`` with optimizer / scheduler / step /
RNG state) and exact resume.

Evaluation (:func:`evaluate_vip`) runs the real patched inference path (``token_prune.patch``)
sample by sample and reports the mean keep ratio, the KL of the pruned model's answer
distribution to the full model's, and greedy-answer agreement.

Modules: ``student`` (the soft-pruned student), ``loop`` (:func:`train_vip`), ``evaluate``
(:func:`evaluate_vip`), ``cli`` (the commands and :func:`load_model`).
"""

from .cli import add_subcommands, load_model
from .evaluate import evaluate_vip
from .loop import OBJECTIVES, TrainResult, default_processor, train_vip
from .student import SoftGlimpseStudent

__all__ = ["train_vip", "evaluate_vip", "TrainResult", "OBJECTIVES", "SoftGlimpseStudent", "default_processor",
           "load_model", "add_subcommands"]
