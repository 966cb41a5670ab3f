"""The configuration of GlimpsePrune's learned parts and the file names of its checkpoints."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, List, Mapping



FORMAT_NAME = "token_prune.glimpse"
FORMAT_VERSION = 1
CONFIG_FILE = "glimpse_config.json"
WEIGHTS_FILE = "model.safetensors"
PUBLIC_CONFIG_FILE = "config.json"
PUBLIC_WEIGHTS_FILE = "new_modules_gp.pt"

_GLIMPSE_SCORES = ("logits", "log_softmax")


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    # bool is an int subclass; a JSON `true` where a count belongs is a bug.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x))


@dataclass
class GlimpseConfig:
    """Sizes of the glimpse embeddings and the VIP, and where they attach.

    Fields:
        llm_hidden_size: H, width of the LLM hidden state (glimpse vector size).
        llm_num_layers: number of decoder layers = number of glimpse vectors.
        llm_num_heads: attention heads of the LLM; input width of the VIP
            (the glimpse attention map has one column per head).
        llm_rms_norm_eps: eps of the glimpse vectors' RMSNorm.
        vision_width: width of the ViT features used as conditions
            (1280 for Qwen2.5-VL, 1024 for CLIP-L).
        vision_layers: ViT block indices giving the conditions, deep to
            shallow; the m-th feeds VIP block m.
        layer: K, the decoder layer whose glimpse attention the VIP reads.
        glimpse_score: "logits" (raw scaled q.k, Qwen) or "log_softmax" (LLaVA).
        hidden_size, cond_size, num_heads, mlp_ratio: VIP widths.
        rope_theta: base of the VIP's 2D RoPE.
        norm_eps: eps of the VIP's RMSNorms.
        model_type: informational; the wrapped LVLM's model_type.
    """

    llm_hidden_size: int
    llm_num_layers: int
    llm_num_heads: int
    vision_width: int
    vision_layers: List[int]
    layer: int
    llm_rms_norm_eps: float = 1e-6
    glimpse_score: str = "logits"
    hidden_size: int = 256
    cond_size: int = 512
    num_heads: int = 4
    mlp_ratio: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    model_type: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.vision_layers, tuple):
            self.vision_layers = list(self.vision_layers)
        self.validate()

    @property
    def num_conditions(self) -> int:
        """Number of VIP blocks (one per ViT condition)."""
        return len(self.vision_layers)

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of the VIP's queries/keys: (hidden + cond) / heads."""
        return (self.hidden_size + self.cond_size) // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """Per-head width of the VIP's values: hidden / heads."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ("llm_hidden_size", "llm_num_layers", "llm_num_heads",
                     "vision_width", "hidden_size", "cond_size", "num_heads",
                     "mlp_ratio"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(
                    f"GlimpseConfig.{name} must be a positive int, got {v!r}")
        for name in ("llm_rms_norm_eps", "norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise ValueError(
                    f"GlimpseConfig.{name} must be a positive finite number, "
                    f"got {v!r}")
        if not _is_int(self.layer) or not 0 <= self.layer < self.llm_num_layers:
            raise ValueError(
                f"GlimpseConfig.layer must be an int in [0, llm_num_layers="
                f"{self.llm_num_layers}), got {self.layer!r}")
        if (not isinstance(self.vision_layers, list) or not self.vision_layers
                or not all(_is_int(v) and v >= 0 for v in self.vision_layers)):
            raise ValueError(
                "GlimpseConfig.vision_layers must be a non-empty list of "
                f"non-negative ints, got {self.vision_layers!r}")
        if self.glimpse_score not in _GLIMPSE_SCORES:
            raise ValueError(
                f"GlimpseConfig.glimpse_score must be one of {_GLIMPSE_SCORES}, "
                f"got {self.glimpse_score!r}")
        if not isinstance(self.model_type, str):
            raise ValueError(
                f"GlimpseConfig.model_type must be a str, got {self.model_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"GlimpseConfig.hidden_size ({self.hidden_size}) must be "
                f"divisible by num_heads ({self.num_heads})")
        qk = self.hidden_size + self.cond_size
        if qk % self.num_heads:
            raise ValueError(
                f"GlimpseConfig.hidden_size + cond_size ({qk}) must be "
                f"divisible by num_heads ({self.num_heads})")
        # 2D RoPE splits each q/k head in half (rotate_half), and each half in
        # two (row, col) frequency sets, so the head dim must split in four.
        if self.qk_head_dim % 4:
            raise ValueError(
                f"GlimpseConfig: q/k head dim (hidden_size + cond_size) / "
                f"num_heads = {self.qk_head_dim} must be divisible by 4 for 2D RoPE")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict of all fields."""
        d = asdict(self)
        d["vision_layers"] = list(d["vision_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GlimpseConfig":
        """Inverse of ``to_dict``; rejects unknown and missing required keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"GlimpseConfig.from_dict expects a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"GlimpseConfig: unknown field(s) {unknown}")
        required = [f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ValueError(f"GlimpseConfig: missing required field(s) {missing}")
        kw = dict(d)
        if isinstance(kw.get("vision_layers"), tuple):
            kw["vision_layers"] = list(kw["vision_layers"])
        return cls(**kw)
