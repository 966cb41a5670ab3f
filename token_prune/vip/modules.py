"""GlimpseModules: the glimpse embeddings and the VIP with their config; save/load in this
package's format and import of the public GlimpsePrune checkpoint layout."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import MISSING, fields
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
from .config import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, GlimpseConfig, PUBLIC_CONFIG_FILE, PUBLIC_WEIGHTS_FILE, WEIGHTS_FILE, _is_int
from .network import GlimpseEmbedding, VIP


# --------------------------------------------------------------------------
# Container, serialisation, public checkpoint import
# --------------------------------------------------------------------------


def _check_state_dict(expected: Mapping[str, torch.Tensor],
                      got: Mapping[str, torch.Tensor],
                      source: str,
                      display: Optional[Mapping[str, str]] = None) -> None:
    """Raise ValueError listing missing/unexpected keys and shape mismatches.

    ``display`` maps our key names to the names the user's file uses, so the
    error points at what they can look up in their checkpoint.
    """
    show = (lambda k: display.get(k, k)) if display else (lambda k: k)
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(show(k) for k in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(show(k) for k in unexpected))
    for k in sorted(set(expected) & set(got)):
        if not isinstance(got[k], torch.Tensor):
            problems.append(f"{show(k)} is a {type(got[k]).__name__}, not a tensor")
        elif tuple(got[k].shape) != tuple(expected[k].shape):
            problems.append(
                f"shape mismatch for {show(k)}: checkpoint has {tuple(got[k].shape)}, "
                f"model expects {tuple(expected[k].shape)}")
        elif not got[k].is_floating_point():
            problems.append(f"{show(k)} has non-float dtype {got[k].dtype}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def _common_float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    # Mixed dtypes cannot be kept as they are; fall back to float32 rather
    # than silently dropping precision.
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


class GlimpseModules(nn.Module):
    """Everything GlimpsePrune adds to an LVLM: ``glimpse`` + ``vip``."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.glimpse = GlimpseEmbedding(config.llm_hidden_size, config.llm_num_layers,
                                        eps=config.llm_rms_norm_eps)
        self.vip = VIP(config)

    # -- construction -----------------------------------------------------

    @classmethod
    def random(cls, config: GlimpseConfig, seed: Optional[int] = None) -> "GlimpseModules":
        """Randomly initialised modules (Linear default init, norms at 1,
        embeddings N(0, 0.02)). With ``seed`` the result is deterministic and
        the global RNG state is left untouched."""
        if seed is None:
            return cls(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    def check_compatible(self, llm_hidden_size: int, llm_num_layers: int,
                         llm_num_heads: int, vision_width: int,
                         num_vision_blocks: int) -> None:
        """Raise ValueError if these modules do not fit a model of these sizes.

        Args:
            llm_hidden_size, llm_num_layers, llm_num_heads: the LLM's.
            vision_width: width of the ViT blocks' outputs.
            num_vision_blocks: number of ViT blocks (vision_layers must index them).
        """
        cfg = self.config
        problems = []
        for name, want in (("llm_hidden_size", llm_hidden_size),
                           ("llm_num_layers", llm_num_layers),
                           ("llm_num_heads", llm_num_heads),
                           ("vision_width", vision_width)):
            have = getattr(cfg, name)
            if have != want:
                problems.append(f"{name}: glimpse modules have {have}, model has {want}")
        bad = [v for v in cfg.vision_layers if v >= num_vision_blocks]
        if bad:
            problems.append(
                f"vision_layers {bad} out of range for a vision tower with "
                f"{num_vision_blocks} blocks")
        if problems:
            raise ValueError("Glimpse modules do not fit this model: " + "; ".join(problems))

    # -- our format -----------------------------------------------------------

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path/glimpse_config.json`` and ``path/model.safetensors``
        (keys ``glimpse.*``, ``vip.*``); creates the directory."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "config": self.config.to_dict()}
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE),
                  metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             map_location: Union[str, torch.device] = "cpu") -> "GlimpseModules":
        """Read a directory written by ``save``. The modules take the dtype
        of the stored tensors."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"GlimpseModules.load: no such directory: {path}")
        cfg_path = os.path.join(path, CONFIG_FILE)
        w_path = os.path.join(path, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GlimpseModules.load: missing file {p}")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"GlimpseModules.load: {cfg_path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or "config" not in meta:
            raise ValueError(
                f"GlimpseModules.load: {cfg_path} is not a {FORMAT_NAME} config "
                "(expected keys 'format', 'format_version', 'config')")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"GlimpseModules.load: {cfg_path} has format_version {version!r}; "
                f"this version reads {FORMAT_VERSION}")
        config = GlimpseConfig.from_dict(meta["config"])
        try:
            state = load_file(w_path, device=str(map_location))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"GlimpseModules.load: cannot read {w_path}: {e}") from e
        return cls._from_state(config, state, source=w_path)

    @classmethod
    def _from_state(cls, config: GlimpseConfig, state: Mapping[str, torch.Tensor],
                    source: str, display: Optional[Mapping[str, str]] = None) -> "GlimpseModules":
        # Build on the meta device: the weights are about to be replaced, so
        # running the random init (N(0, .02) over [L, 1, H] etc.) is waste.
        with torch.device("meta"):
            mods = cls(config)
        _check_state_dict(mods.state_dict(), state, source, display)
        device = next(iter(state.values())).device
        mods = mods.to_empty(device=device).to(_common_float_dtype(state))
        mods.load_state_dict(state, strict=True)
        return mods

    # -- public GlimpsePrune format ------------------------------------------

    @classmethod
    def from_public_checkpoint(cls, path: Union[str, os.PathLike],
                               config_overrides: Optional[Mapping[str, Any]] = None
                               ) -> "GlimpseModules":
        """Import the public GlimpsePrune layout.

        ``path`` holds ``config.json`` (the wrapped LVLM's HF config plus
        GlimpsePrune fields) and ``new_modules_gp.pt`` (entries ``attn_fuser``,
        ``learnable_embeddings`` [L, 1, H], ``le_proj``, ``le_norm``).
        ``config_overrides`` replaces GlimpseConfig fields after parsing (e.g.
        ``vision_width`` when the config does not state it). Only checkpoints
        with a glimpse vector for every layer 0..L-1 are supported. Auxiliary
        deep-supervision heads ``attn_out_projs.{0..n-2}`` are ignored (only
        the last head is used at inference). Modules take the checkpoint's dtype.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"from_public_checkpoint: no such directory: {path}")
        cfg_path = os.path.join(path, PUBLIC_CONFIG_FILE)
        w_path = os.path.join(path, PUBLIC_WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"from_public_checkpoint: missing file {p}")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"from_public_checkpoint: {cfg_path} is not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ValueError(f"from_public_checkpoint: {cfg_path} must hold a JSON object")

        try:
            ckpt = torch.load(w_path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise ValueError(f"from_public_checkpoint: cannot read {w_path}: {e}") from e
        if not isinstance(ckpt, dict):
            raise ValueError(f"from_public_checkpoint: {w_path} must hold a dict, got {type(ckpt).__name__}")
        entries = ("attn_fuser", "learnable_embeddings", "le_proj", "le_norm")
        missing = [e for e in entries if e not in ckpt]
        unexpected = sorted(str(k) for k in ckpt if k not in entries)
        if missing or unexpected:
            raise ValueError(
                f"from_public_checkpoint: {w_path}: missing entries {missing}, "
                f"unexpected entries {unexpected} (expected exactly {list(entries)})")
        for e in ("attn_fuser", "le_proj", "le_norm"):
            if not isinstance(ckpt[e], Mapping):
                raise ValueError(f"from_public_checkpoint: {w_path}: '{e}' must be a state dict")
        if not isinstance(ckpt["learnable_embeddings"], torch.Tensor):
            raise ValueError(f"from_public_checkpoint: {w_path}: 'learnable_embeddings' must be a tensor")

        fields_ = _public_config_fields(hf, cfg_path, ckpt)
        if config_overrides:
            names = {f.name for f in fields(GlimpseConfig)}
            unknown = sorted(set(config_overrides) - names)
            if unknown:
                raise ValueError(f"from_public_checkpoint: unknown config_overrides {unknown}")
            fields_.update(config_overrides)
        if fields_.get("vision_width") is None:
            raise ValueError(
                f"from_public_checkpoint: {cfg_path} gives no vision width "
                "(vision_config.hidden_size or mm_hidden_size); pass "
                "config_overrides={'vision_width': ...}")
        config = GlimpseConfig.from_dict(fields_)

        n = config.num_conditions
        state: Dict[str, torch.Tensor] = {}
        display: Dict[str, str] = {}
        aux_heads = tuple(f"attn_out_projs.{i}." for i in range(n - 1))
        for k, v in ckpt["attn_fuser"].items():
            if k.startswith(aux_heads):
                continue
            state["vip." + k] = v
            display["vip." + k] = "attn_fuser." + k
        state["glimpse.embeddings"] = ckpt["learnable_embeddings"]
        display["glimpse.embeddings"] = "learnable_embeddings"
        for src, dst in (("le_proj", "glimpse.proj"), ("le_norm", "glimpse.norm")):
            for k, v in ckpt[src].items():
                state[f"{dst}.{k}"] = v
                display[f"{dst}.{k}"] = f"{src}.{k}"
        # Name keys the checkpoint lacks by their public names too.
        for k in cls._expected_keys(config):
            if k not in display:
                display[k] = _public_name(k)
        return cls._from_state(config, state, source=w_path, display=display)

    @classmethod
    def _expected_keys(cls, config: GlimpseConfig) -> List[str]:
        with torch.device("meta"):
            return list(cls(config).state_dict().keys())


def _public_name(key: str) -> str:
    if key.startswith("vip."):
        return "attn_fuser." + key[4:]
    return {"glimpse.embeddings": "learnable_embeddings"}.get(
        key, key.replace("glimpse.proj.", "le_proj.").replace("glimpse.norm.", "le_norm."))


def _public_config_fields(hf: Mapping[str, Any], cfg_path: str,
                          ckpt: Mapping[str, Any]) -> Dict[str, Any]:
    """GlimpseConfig fields from a public GlimpsePrune config.json."""
    text = hf.get("text_config") if isinstance(hf.get("text_config"), Mapping) else {}
    vision = hf.get("vision_config") if isinstance(hf.get("vision_config"), Mapping) else {}

    def llm(key: str, default: Any = MISSING) -> Any:
        # Composite configs (LLaVA-HF, newer Qwen2.5-VL) keep the LLM's sizes
        # in text_config; older ones have them at the top level.
        if key in text:
            return text[key]
        if key in hf:
            return hf[key]
        if default is not MISSING:
            return default
        raise ValueError(f"from_public_checkpoint: {cfg_path} has no '{key}' "
                         "(looked at the top level and in text_config)")

    def gp(key: str, default: Any = MISSING) -> Any:
        if key in hf:
            return hf[key]
        if default is not MISSING:
            return default
        raise ValueError(f"from_public_checkpoint: {cfg_path} has no GlimpsePrune field '{key}'")

    num_layers = llm("num_hidden_layers")
    selected = list(gp("selected_layers"))
    if len(selected) != 1:
        raise ValueError(
            f"from_public_checkpoint: selected_layers={selected}; only checkpoints "
            "reading a single decoder layer are supported")
    le_layers = list(gp("le_layers"))
    if not _is_int(num_layers) or le_layers != list(range(num_layers)):
        raise ValueError(
            f"from_public_checkpoint: le_layers={le_layers} must be every layer "
            f"0..{num_layers - 1 if _is_int(num_layers) else '?'} in order; only "
            "checkpoints with a glimpse vector per decoder layer are supported")
    for key, want in (("attn_fuse_type", "AttnFuserV1"), ("attn_fuse_hidden_act", "silu"),
                      ("le_length", 1), ("le_norm_type", "rmsnorm")):
        if key in hf and hf[key] != want:
            raise ValueError(
                f"from_public_checkpoint: {key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("attn_fuse_global") is False:
        warnings.warn(
            f"{cfg_path}: attn_fuse_global is false (the public Qwen code then "
            "attends within ViT windows); this VIP always attends over whole "
            "images, so its outputs may differ from the original's", stacklevel=3)

    vision_width = vision.get("hidden_size", hf.get("mm_hidden_size"))
    if vision_width is None:
        # LLaVA-1.5 configs name the vision tower but not its width; the
        # condition projections' input width states it unambiguously.
        w = ckpt["attn_fuser"].get("cond_in_projs.0.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            vision_width = int(w.shape[1])

    return {
        "llm_hidden_size": llm("hidden_size"),
        "llm_num_layers": num_layers,
        "llm_num_heads": llm("num_attention_heads"),
        "llm_rms_norm_eps": float(llm("rms_norm_eps", 1e-6)),
        "vision_width": vision_width,
        "vision_layers": list(gp("selected_visual_layers")),
        "layer": selected[0],
        "glimpse_score": "logits" if gp("use_attention_logits", False) else "log_softmax",
        "hidden_size": gp("attn_fuse_size"),
        "cond_size": gp("visual_cond_size"),
        "num_heads": gp("attn_fuse_num_heads"),
        # GlimpsePrune's fork registers its models as "<model_type>_gp".
        "model_type": str(hf.get("model_type", "")).removesuffix("_gp"),
    }
