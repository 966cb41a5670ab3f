"""Accuracy retention of pruned models on a small vision-language model trained from scratch.

Three steps, each a function and a CLI subcommand:

* :func:`train_small_lvlm` (``token-prune train-small-lvlm``): build a small
  ``Qwen2_5_VLForConditionalGeneration`` from a config and train it from scratch on the
  grounded VQA task of :mod:`token_prune.synthetic` (prompt: ``<vision_start> <image>*N
  <vision_end> question``, loss on the answer word and EOS only). Writes ``save_pretrained``
  weights, ``tokenizer.json`` and ``small_lvlm.json`` (preset, seed, task, command) to a
  directory outside git (``checkpoints/``). The preset and seed reproduce a run.
* :func:`eval_accuracy` (``token-prune eval-accuracy``): exact-match accuracy on a held-out split
  for the unpatched model and every method at keep ratios 0.111 / 0.222 / 0.333: GlimpsePrune
  (VIP trained by :func:`token_prune.train_vip`; capped with ``max_keep_ratio`` and with the plain
  threshold), ALVTS (calibrated with :func:`token_prune.calibrate_alvts`, and SVD only), FastV
  (K=2) and random pruning (the floor). Results go to JSON + Markdown + a plot.
* ``--pictures N``: per held-out sample one PNG with, per method, the image and its token grid,
  pruned cells dimmed (ALVTS: shaded by the fraction of layers that processed each token).

Presets (``PRESETS``):

* ``cpu``: 96 px images, 36 visual tokens, grid-aligned objects, colour and shape questions,
  0.38M parameters; 4000 steps of 16, 5-15 minutes on one CPU core depending on load (about
  0.1-0.2 s a step). ``--threads 1``: on a busy two-core machine more threads make it slower.
* ``h100``: 448-896 px images (256-1024 visual tokens), free placement, all six question types,
  bf16, progressive resizing from 224-336 px, 12 data workers; sized for under 15 minutes on one
  H100 but not yet run on one (see the README).
* ``test``: 64 px images, a 3-layer LLM; seconds, for the test suite.

What made a from-scratch model learn this quickly (found with trial runs while choosing the
CPU preset): weight init ~1/sqrt(width) instead of HF's 0.02; questions ending in the word that
picks the region; few visual tokens per object (alignment to the token grid) and few tokens
overall; a curriculum with single-object images. Before these the loss sat at the answer prior
for thousands of steps.

Modules: :mod:`~token_prune.eval.synthetic` (the task and its word tokenizer),
:mod:`~token_prune.eval.small_lvlm` (presets, model, processor), :mod:`~token_prune.eval.train_small`
(training), :mod:`~token_prune.eval.accuracy` (evaluation and reports),
:mod:`~token_prune.eval.pictures`, :mod:`~token_prune.eval.cli`.
"""

from .accuracy import eval_accuracy, vip_layer_of
from .pictures import draw_token_picture
from .small_lvlm import PRESETS, EvalSpec, ModelSpec, Preset, SmallVLMProcessor, TrainSpec, build_small_lvlm, load_small_lvlm
from .train_small import answer_accuracy, train_small_lvlm

__all__ = ["PRESETS", "Preset", "ModelSpec", "TrainSpec", "EvalSpec", "SmallVLMProcessor", "build_small_lvlm",
           "load_small_lvlm", "train_small_lvlm", "eval_accuracy", "answer_accuracy", "draw_token_picture",
           "vip_layer_of"]
