"""The one registry of methods: name -> config class.

A method registers its config class with `register`; everything that lists, parses, checks
or stores methods asks here: ``lowbit quantize --method`` and ``lowbit finetune --method``
(their choices, flags and --help), `lowbit.quantize_model`, checkpoint headers
(`config_from_dict`) and the methods table in docs/methods.md (`methods_table`).
"""

from __future__ import annotations

from lowbit.errors import LowbitError, SpecError
from lowbit.methods.config import KINDS, MethodConfig, QuantizeConfig
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import from_dict, options, shown_default

METHODS: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Add a config class under its ``name`` (a class decorator)."""
    for attr in ("name", "kind", "summary"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"{cls.__name__} must set the class attribute {attr!r} to register")
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind {cls.kind!r} is not one of {KINDS}")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice ({METHODS[cls.name].__name__}, {cls.__name__})")
    METHODS[cls.name] = cls
    return cls


def quantize_methods() -> dict[str, type[QuantizeConfig]]:
    """The post-training quantisers (`lowbit quantize`), in registration order."""
    return {name: cls for name, cls in METHODS.items() if issubclass(cls, QuantizeConfig) and cls.kind != "pruning"}


def pruning_methods() -> dict[str, type[QuantizeConfig]]:
    """The pruning methods (`lowbit prune`); `lowbit.quantize_model` runs them like the quantisers."""
    return {name: cls for name, cls in METHODS.items() if cls.kind == "pruning"}


def training_methods() -> dict[str, type[MethodConfig]]:
    """The methods that train (`lowbit finetune`)."""
    return {name: cls for name, cls in METHODS.items() if cls.kind == "training"}


def method_config(name: str) -> type[MethodConfig]:
    """The config class registered as ``name``."""
    cls = METHODS.get(name)
    if cls is None:
        raise LowbitError(f"method {name!r} is unknown; use one of {', '.join(METHODS)}")
    return cls


def config_from_dict(data: dict) -> MethodConfig:
    """Rebuild a config from `MethodConfig.to_dict` output (a checkpoint header's "method")."""
    if not isinstance(data, dict) or "name" not in data:
        raise SpecError(f"a method config must be a mapping with a 'name', got {data!r}")
    cls = method_config(data["name"])
    version = data.get("version", 1)
    if version > cls.version:
        raise SpecError(f"method {cls.name} config version {version} is newer than this lowbit reads ({cls.version}); upgrade lowbit")
    fields = {k: v for k, v in data.items() if k not in ("name", "version")}
    return from_dict(cls, fields, f"method {cls.name}")


def methods_table(markdown: bool = True) -> str:
    """Every registered method: kind, whether it calibrates, its default format, which spec
    fields it lets change and its own options with their defaults. docs/methods.md holds
    this table; a test keeps the two equal."""
    rows = [("method", "kind", "calibration", "default format", "spec flags", "own options (default)", "what it does")]
    for name, cls in METHODS.items():
        spec = cls.default_spec()
        spec_flags = [o.name for o in options(QuantSpec) if o.path[0] in cls.spec_fields] if spec is not None else []
        own = [f"{o.name} {shown_default(o) or 'none'}" for o in options(cls) if o.path[0] not in ("spec", "skip", "head")]
        rows.append((name, cls.kind, "yes" if cls.calibrated else "no", cls.default_format(),
                     " ".join(spec_flags) or "none", "; ".join(own) or "none", cls.summary))
    if not markdown:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[6] for r in rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    cell = lambda c: c.replace("|", "\\|")  # noqa: E731  (a bar inside a cell would end it)
    lines += ["| " + " | ".join(f"`{c}`" if i == 0 else cell(c) for i, c in enumerate(r)) + " |" for r in rows[1:]]
    return "\n".join(lines)
