"""token_prune: visual-token pruning for Hugging Face vision-language models.

    import token_prune
    handle = token_prune.patch(model, method="glimpse", threshold=0.5)
    out = model.generate(**inputs)      # ordinary HF generate
    handle.stats                        # what was kept, per sample and layer
    handle.remove()                     # the model is exactly as before

Importing the package loads only what patching needs; the training, calibration and evaluation
entry points below are imported on first use.
"""

from ._ops import compact_tokens
from .api import PatchHandle, get_handle, patch, unpatch
from .methods import supported_methods
from .methods.alvts_selector import FullWidthSelector, GroupRopeSelector, LowRankSelector
from .models import supported_models
from .vip import GlimpseConfig, GlimpseModules

__version__ = "0.1.0"

# name -> module of the entry points that pull in heavier code (training loops, data, reports).
_LAZY = {
    "train_vip": "train",
    "evaluate_vip": "train",
    "calibrate_alvts": "alvts_calibration",
    "train_small_lvlm": "eval",
    "eval_accuracy": "eval",
    "train_rl": "train.rl",  # GlimpsePrune+ (needs the rl extra: trl, peft)
    "load_rl_adapters": "train.rl",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "patch",
    "unpatch",
    "get_handle",
    "PatchHandle",
    "GlimpseConfig",
    "GlimpseModules",
    "compact_tokens",
    "LowRankSelector",
    "GroupRopeSelector",
    "FullWidthSelector",
    "supported_methods",
    "supported_models",
    "train_vip",
    "evaluate_vip",
    "calibrate_alvts",
    "train_small_lvlm",
    "eval_accuracy",
    "train_rl",
    "load_rl_adapters",
    "__version__",
]
