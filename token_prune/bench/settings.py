"""What the benchmark measures: settings (a method and its options) parsed from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field




SCHEMA = "token_prune.bench/1"


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (bad option, missing device)."""


class AgreementError(RuntimeError):
    """The patched model at keep_ratio=1.0 does not reproduce the unpatched model."""


def methods() -> tuple[str, ...]:
    """``none`` (the unpatched model) and every registered method."""
    from ..methods import supported_methods

    return ("none", *supported_methods())



@dataclass
class Setting:
    """One configuration to measure: a method (``none`` = unpatched) and its patch options."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def keep_ratio(self) -> float:
        return 1.0 if self.method == "none" else float(self.options.get("keep_ratio", 1.0))

    @property
    def family_key(self) -> str:
        """The setting without its keep ratio: one plot series / one agreement check."""
        opts = {k: v for k, v in self.options.items() if k != "keep_ratio"}
        return _label(self.method, opts)

    @property
    def label(self) -> str:
        return _label(self.method, self.options)

    def to_dict(self) -> dict:
        return {"method": self.method, "options": dict(self.options), "label": self.label}

    def record(self, batch: int) -> dict:
        """The fields that open every result row of this setting (both timing modes)."""
        return {"setting": self.label, "method": self.method, "options": dict(self.options),
                "series": self.family_key, "keep_ratio": self.keep_ratio, "batch": batch}


def _label(method: str, opts: dict) -> str:
    if method == "none":
        return "unpatched"
    parts = [method]
    rest = dict(opts)
    if "layer" in rest:
        parts.append(f"K={rest.pop('layer')}")
    if "keep_ratio" in rest:
        parts.append(f"f={rest.pop('keep_ratio'):g}")
    if rest.get("start_layer") == 0:
        rest.pop("start_layer")
    parts += [f"{k}={v}" for k, v in sorted(rest.items())]
    return " ".join(parts)


def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_setting(spec: str) -> tuple[str, dict]:
    """``"glimpse:layer=18,keep_ratio=0.074"`` -> ``("glimpse", {"layer": 18, "keep_ratio": 0.074})``.
    ``none`` (or ``unpatched``) is the unpatched model."""
    method, _, rest = spec.strip().partition(":")
    method = method.strip().lower()
    if method == "unpatched":
        method = "none"
    if method not in methods():
        raise BenchError(f"setting {spec!r}: method must be one of {', '.join(methods())}")
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise BenchError(f"setting {spec!r}: expected key=value, got {item!r}")
        opts[key.strip()] = _value(val.strip())
    if method == "none" and opts:
        raise BenchError(f"setting {spec!r}: the unpatched model takes no options")
    return method, opts


def default_options(method: str, family: str, num_layers: int) -> dict:
    """The layer options a setting leaves out, as the method itself would choose them for this
    family and depth, made explicit so every result names its K."""
    if method == "none":
        return {}
    from ..methods import method_class
    from ..models import adapter_class

    return method_class(method).layer_defaults(adapter_class(family), num_layers)


def expand_settings(
    specs: list[str], keep_ratios, family: str, num_layers: int, baseline: bool = True
) -> list[Setting]:
    """Parse ``specs``; a method setting without ``keep_ratio`` (nor ``threshold``) becomes one
    setting per keep ratio (``keep_ratios``: a list, or a dict method -> list). The unpatched
    setting comes first, duplicates are dropped."""
    out: list[Setting] = []
    seen = set()
    for spec in specs:
        method, opts = parse_setting(spec)
        full = {**default_options(method, family, num_layers), **opts}
        if method != "none" and "keep_ratio" not in full and "threshold" not in full:
            ratios = keep_ratios.get(method, []) if isinstance(keep_ratios, dict) else keep_ratios
            if not ratios:
                raise BenchError(f"setting {spec!r} has no keep_ratio and no --keep-ratios apply")
            variants = [{**full, "keep_ratio": float(f)} for f in ratios]
        else:
            variants = [full]
        for o in variants:
            s = Setting(method, o)
            if s.label not in seen:
                seen.add(s.label)
                out.append(s)
    out.sort(key=lambda s: s.method != "none")
    if baseline and not any(s.method == "none" for s in out):
        out.insert(0, Setting("none"))
    return out
