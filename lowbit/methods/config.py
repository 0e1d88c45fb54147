"""What every method's configuration shares.

A method is one frozen dataclass (its config) registered by name (`lowbit.methods.registry`).
The config holds the method's `QuantSpec` where it has one, and its own options, each
declared once with its default and help (`lowbit.settings.setting`). It validates itself
at construction: a field it cannot honour is refused there, with a one-line message that
says what to do, so the CLI and the Python API refuse the same settings. Its class
attributes say what the method is and needs; the registry, the CLI, the checkpoint header
and docs/methods.md are derived from them.

Importing a config must stay cheap (no torch): the CLI builds its parser from them. The
work itself (`quantize_weight`, or the engine's `statistics` / `quantize_group`) imports
its algorithm when it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import ClassVar

from lowbit.errors import SpecError
from lowbit.numerics.spec import QuantSpec
from lowbit.settings import check_patterns, flag_of, setting, to_dict

# Linears left in float unless the user says otherwise: the output head, which llama.cpp's
# Q4 files also keep at higher precision and which is often tied to the input embeddings.
DEFAULT_SKIP = ("lm_head",)
# The output head's own spec (`--head-bits`), rounded to nearest: int8 per output channel,
# or int4 groups of 128; both run on the CPU kernels.
HEAD_SPECS = {8: QuantSpec(bits=8, granularity="channel", group_size=None), 4: QuantSpec(bits=4, group_size=128)}

KINDS = ("weight-only", "weight+activation", "training", "pruning")
ALL_SPEC_FIELDS = frozenset(f.name for f in fields(QuantSpec))
# How --budget weighs a candidate spec's error (`lowbit.calibration.budget`).
BUDGET_SENSITIVITIES = ("fisher", "hessian")
# The default weight format of the integer weight-only methods (rtn, gptq, awq, qat).
WEIGHT_SPEC = QuantSpec(bits=4, group_size=128)


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """The base of every method's config.

    Class attributes (set by each method):
    name: the registered name (``--method NAME``).
    kind: "weight-only", "weight+activation" or "training".
    summary: one line for --help and the methods table.
    reference: where its maths is (a section of the report, or the paper).
    calibrated: whether it runs on calibration samples (block by block, `lowbit.calibration`).
    inverts_hessian: whether it solves with the inverse of H = 2XXᵀ (report §7.2), whose
        rank is at most the number of calibration tokens.
    spec_fields: the `QuantSpec` fields the user may change; every other one is fixed at
        the default spec's value and refused if changed (`refusals` says why, by field).
    version: bumped when a field changes meaning; stored in checkpoint headers.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False
    inverts_hessian: ClassVar[bool] = False
    spec_fields: ClassVar[frozenset[str]] = frozenset()
    refusals: ClassVar[dict[str, str]] = {}
    version: ClassVar[int] = 1

    def __post_init__(self):
        spec = getattr(self, "spec", None)
        if spec is not None:
            self.check_spec(spec)

    @classmethod
    def default_spec(cls) -> QuantSpec | None:
        field = cls.__dataclass_fields__.get("spec")
        return None if field is None else field.default

    @classmethod
    def default_format(cls) -> str:
        """The stored format with default settings, for the methods table."""
        spec = cls.default_spec()
        return spec.describe() if spec is not None else "int8 per channel"

    def check_spec(self, spec: QuantSpec) -> None:
        """Refuse every spec field this method does not honour (changed from its default)."""
        if not isinstance(spec, QuantSpec):
            raise SpecError(f"{self.name}: spec must be a QuantSpec, got {type(spec).__name__}")
        default = self.default_spec()
        for f in fields(QuantSpec):
            value = getattr(spec, f.name)
            if f.name in self.spec_fields or value == getattr(default, f.name):
                continue
            flag = flag_of(QuantSpec, f.name)
            given = f"{f.name}={value!r}" + (f" ({flag})" if flag else "")
            why = self.refusals.get(f.name, f"its {f.name} is fixed at {getattr(default, f.name)!r}")
            raise SpecError(f"{self.name} cannot take {given}: {why}; drop it")

    def to_dict(self) -> dict:
        """What a checkpoint header stores: the name, the config's version and every field."""
        return {"name": self.name, "version": self.version, **to_dict(self)}

    def describe(self) -> str:
        """One line for logs: the spec's label (if any) and the options that differ from
        their defaults."""
        spec = getattr(self, "spec", None)
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if f.name not in ("spec", "skip", "layer_bits") and getattr(self, f.name) != f.default]
        parts = ([spec.describe()] if spec is not None else []) + changed
        return f"{self.name} " + ", ".join(parts) if parts else self.name


def _head_spec(bits: int) -> QuantSpec:
    return HEAD_SPECS[bits]


def _layer_format(text: str) -> tuple[str, str]:
    pattern, sep, fmt = text.rpartition("=")
    if not sep or not pattern:
        raise SpecError(f"--layer-format takes REGEX=FORMAT (e.g. 'down_proj=q6_k'), got {text!r}")
    return pattern, fmt


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(MethodConfig):
    """A post-training method (`lowbit quantize`, `lowbit.quantize_model`): which linears it
    leaves in float, and whether it also rounds the output head."""

    skip: tuple[str, ...] = setting(DEFAULT_SKIP, "regex of the linears to leave in float (repeatable)",
                                    repeat=True, metavar="REGEX")
    head: QuantSpec | None = setting(None, "also round the output head to nearest: 8 = int8 per output channel, 4 = int4 groups of 128 "
                                     "(without it the head stays float)", flag="--head-bits", parse=int, choices=tuple(HEAD_SPECS), convert=_head_spec)

    layer_formats: tuple[tuple[str, str], ...] = setting(
        (), "REGEX=FORMAT: linears whose name matches take that --format instead (repeatable, first match wins; "
            "a llama.cpp-style mix, e.g. 'down_proj=q6_k')", flag="--layer-format", repeat=True, metavar="REGEX=FORMAT",
        parse=_layer_format)

    layer_bits: tuple[tuple[str, int, int | None], ...] = setting(
        (), "(linear, bits, group size): the spec of each named linear (the plan --budget chose)", cli=False)

    # whether the method quantises each layer with its own spec (`spec_for`): rtn, gptq, awq
    per_layer_specs: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.skip, list):
            object.__setattr__(self, "skip", tuple(self.skip))
        check_patterns(QuantizeConfig, "skip", self.skip)
        formats = tuple(tuple(pair) for pair in self.layer_formats)
        object.__setattr__(self, "layer_formats", formats)
        object.__setattr__(self, "layer_bits", tuple(tuple(entry) for entry in self.layer_bits))
        if (formats or self.layer_bits) and not self.per_layer_specs:
            raise SpecError(f"{self.name} cannot take --layer-format (or per-layer bits): it quantises every layer with one format; drop it")
        check_patterns(QuantizeConfig, "layer_formats", tuple(pattern for pattern, _ in formats))
        for pattern, fmt in formats:
            self.spec.with_changes(format=fmt)  # refuses an unknown or conflicting format now
        if self.head is not None and not isinstance(self.head, QuantSpec):
            raise SpecError(f"head must be a QuantSpec or None, got {type(self.head).__name__}")
        super().__post_init__()

    def module(self, weight, bias):
        """The module that holds one linear's result of ``quantize_weight`` in the model."""
        from lowbit.modules.quant_linear import QuantLinear

        return QuantLinear(weight, bias)

    def requested_spec(self, name: str) -> QuantSpec:
        """The spec asked for the linear ``name``: ``spec`` with the bits and group size
        ``layer_bits`` gives that name, else with the format of the first ``layer_formats``
        entry whose regex matches it."""
        for layer, bits, group_size in self.layer_bits:
            if layer == name:
                return self.spec.with_changes(bits=bits, group_size=group_size)
        for pattern, fmt in self.layer_formats:
            if re.search(pattern, name):
                return self.spec.with_changes(format=fmt)
        return self.spec

    def spec_for(self, name: str, in_features: int) -> QuantSpec:
        """The spec the linear ``name`` (rows of ``in_features`` weights) is quantised with:
        the first ``layer_formats`` entry whose regex matches its name sets the format; a
        GGML K-quant whose 256-block does not divide the rows takes llama.cpp's fallback
        type (q4_k -> q5_0, q3_k -> q4_0, ...), as llama.cpp's own quantiser does."""
        from lowbit.numerics.ggml_types import ggml_type_for

        spec = self.requested_spec(name)
        if spec.ggml is not None:
            fitting = ggml_type_for(in_features, spec.ggml.name)
            if fitting is None:
                raise SpecError(f"{name} has rows of {in_features} weights: no GGML block type fits "
                                f"(blocks of 32 at least); leave it in float with --skip")
            if fitting is not spec.ggml:
                spec = spec.with_changes(format=fitting.name)
        return spec


@dataclass(frozen=True, kw_only=True)
class CalibratedWeightConfig(QuantizeConfig):
    """A weight-only method that runs block by block on calibration samples (gptq, awq):
    integer weights, W4 g128 by default, every spec field but double quantisation (each
    subclass says in ``refusals`` why it cannot honour that)."""

    kind = "weight-only"
    calibrated = True
    spec_fields = ALL_SPEC_FIELDS - {"double_quant"}
    per_layer_specs = True

    spec: QuantSpec = setting(WEIGHT_SPEC, "the weight format")
    budget: float | None = setting(
        None, "average bits per weight over the quantised linears: each linear's bits (2-8) and group size (32, 64, 128) "
              "are chosen from its measured sensitivity so that together they store this or just under it "
              "(e.g. 3.5 or 4.25; the plan is printed and stored)", parse=float, metavar="BITS", accepts="a number of bits, e.g. 4.25")
    budget_by: str = setting(
        "fisher", "how --budget weighs each linear's error: fisher (its cost to the loss, from each sample's gradients) or "
                  "hessian (the linear's own output error on its inputs)", choices=BUDGET_SENSITIVITIES)

    def __post_init__(self):
        super().__post_init__()
        if self.budget_by not in BUDGET_SENSITIVITIES:
            raise SpecError(f"--budget-by {self.budget_by!r} is unknown; use one of {', '.join(BUDGET_SENSITIVITIES)}")
        if self.budget is None:
            return
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 1.0 < self.budget <= 16.0:
            raise SpecError(f"--budget is the average bits per weight, a number above 1 and at most 16 (e.g. 4.25), got {self.budget!r}")
        if self.spec.format != "int":
            raise SpecError(f"--budget chooses bits and group sizes of integer grids; format {self.spec.format!r} fixes them "
                            "(for a mix of GGML types give --layer-format REGEX=FORMAT instead)")
        if self.layer_formats:
            raise SpecError("--budget chooses every linear's spec itself; drop --layer-format or --budget")

    def extra_bytes(self, in_features: int) -> int:
        """Bytes a quantised linear stores beyond codes, scales and zero-points (none here)."""
        return 0
