"""token_prune: visual-token pruning for Hugging Face vision-language models.

    import token_prune
    handle = token_prune.patch(model, method="glimpse", threshold=0.5)
    out = model.generate(**inputs)      # ordinary HF generate
    handle.stats                        # what was kept, per sample and layer
    handle.remove()                     # the model is exactly as before
"""

from ._ops import compact_tokens
from .api import PatchHandle, get_handle, patch, unpatch
from .methods import supported_methods
from .methods.alvts import LowRankSelector, calibrate_alvts
from .models import supported_models
from .vip import GlimpseConfig, GlimpseModules
from .accuracy import eval_accuracy, train_small_lvlm  # noqa: F401,E402 (accuracy benchmark, issue 7)
from .train import evaluate_vip, train_vip  # noqa: F401,E402 (GlimpsePrune stage 1 training, issue 5)
from .rl import load_rl_adapters, train_rl  # noqa: F401,E402 (GlimpsePrune+ stage 2; needs the rl extra)

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "get_handle",
    "PatchHandle",
    "GlimpseConfig",
    "GlimpseModules",
    "compact_tokens",
    "calibrate_alvts",
    "LowRankSelector",
    "supported_methods",
    "supported_models",
    "__version__",
]
