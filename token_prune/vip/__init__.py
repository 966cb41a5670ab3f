"""GlimpsePrune's learned parts: glimpse embeddings and the visual token
importance predictor (VIP).

This package is self-contained (no imports from the rest of ``token_prune``,
except a lazy, optional one of the fused CUDA attention kernel) so it can be
used, tested and serialised on its own: ``config`` (GlimpseConfig), ``rope``
(2D positions), ``network`` (the VIP and the glimpse embeddings), ``modules``
(GlimpseModules and checkpoint IO). Submodule names follow the
public GlimpsePrune checkpoint so state dicts are interchangeable with it:

* ``GlimpseEmbedding`` - one learned vector per decoder layer, passed through
  ``Linear(H, H)`` and RMSNorm (public names ``learnable_embeddings``,
  ``le_proj``, ``le_norm``).
* ``VIP`` - turns the glimpse attention map ``[N, num_heads]`` of layer K plus
  a few intermediate ViT features into one keep logit per visual token
  (public name ``attn_fuser``).
* ``GlimpseModules`` - both of the above plus their ``GlimpseConfig``, with
  save/load in this package's format and an importer for the public format.

Shapes: ``N`` is the total number of visual tokens of all images in a call
(after the vision merger), ``H`` the LLM hidden size.
"""

from .config import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE, GlimpseConfig
from .modules import GlimpseModules
from .network import VIP, GlimpseEmbedding, RMSNorm
from .rope import apply_rope, cu_seqlens_from_grid, positions_from_grid, rope_2d_cos_sin, rope_2d_cos_sin_from_positions

__all__ = [
    "GlimpseConfig",
    "RMSNorm",
    "VIP",
    "GlimpseEmbedding",
    "GlimpseModules",
    "rope_2d_cos_sin",
    "rope_2d_cos_sin_from_positions",
    "positions_from_grid",
    "apply_rope",
    "cu_seqlens_from_grid",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]
