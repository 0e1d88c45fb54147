"""Settings: frozen dataclasses whose fields describe themselves.

Every option a user can set (a `QuantSpec` field, a method's option, a calibration or a
training setting) is declared once, as a dataclass field made by `setting`: its default, a
one-line help text and, where the field's name would not do, its flag. From these
declarations

- the CLI builds its flags, their --help text and their parsing (`lowbit.cli`),
- checkpoint headers store `to_dict` and read it back with `from_dict`,
- the methods table of docs/methods.md is generated (`lowbit methods --markdown`).

Validation stays with each dataclass, which checks its own values at construction, so the
CLI and the Python API refuse the same things with the same message (`label` names a
field and its flag in those messages). Nothing here imports torch: the CLI parses its
arguments before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from lowbit.errors import SpecError

_KEY = "lowbit"
TAKES_VALUE = object()  # `Flag.switch` of a flag that takes an argument


@dataclass(frozen=True)
class Flag:
    """How one setting appears on the command line.

    help: one line for --help.
    flag: the flag (default: ``--`` and the field's name with dashes).
    choices: the accepted values, when they are a fixed list.
    parse: the flag's argument (a string) to a value (default: the field's type).
    convert: the parsed (and choice-checked) value to the field's value, if they differ.
    accepts: what a valid argument looks like, for the one-line error when it does not parse.
    switch: a boolean flag: the value ``--flag`` gives (``--no-flag`` gives the other one).
    repeat: the flag may be given several times; the field holds a tuple of the values.
    cli: False for settings only the Python API sets.
    """

    help: str
    flag: str | None = None
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None
    convert: Callable[[Any], Any] | None = None
    accepts: str | None = None
    switch: Any = TAKES_VALUE
    repeat: bool = False
    metavar: str | None = None
    cli: bool = True


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with its default and how it appears on the command line (`Flag`)."""
    return field(default=default, metadata={_KEY: Flag(help=help, **flag)})


@dataclass(frozen=True)
class Option:
    """One flag-bearing field reached from a settings class, nested ones included.

    path: field names from the outer class down, e.g. ("spec", "group_size").
    flag: its `Flag`, with ``flag.flag`` filled in.
    default: the value the outer class's default gives it.
    type: the field's annotated type (resolved).
    """

    path: tuple[str, ...]
    flag: Flag
    default: Any
    type: Any

    @property
    def name(self) -> str:
        return self.flag.flag

    @property
    def dest(self) -> str:
        return self.flag.flag.lstrip("-").replace("-", "_")


def flag_of(cls, name: str) -> str | None:
    """The command-line flag of field ``name`` of ``cls`` (None if it has none)."""
    meta = next(f for f in fields(cls) if f.name == name).metadata.get(_KEY)
    if meta is None or not meta.cli:
        return None
    return meta.flag or "--" + name.replace("_", "-")


def label(cls, name: str) -> str:
    """A field as error messages name it: ``samples (--calib-samples)``."""
    flag = flag_of(cls, name)
    return name if flag is None else f"{name} ({flag})"


def check_patterns(cls, name: str, patterns: Any) -> None:
    """Field ``name`` of ``cls`` must hold a tuple of regular expressions that compile."""
    if isinstance(patterns, str) or not isinstance(patterns, tuple):
        raise SpecError(f"{label(cls, name)} must be a tuple of regular expressions, got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise SpecError(f"{label(cls, name)}: {pattern!r} is not a regular expression ({err}); fix or escape it") from None


def shown_default(option: Option) -> str | None:
    """How an option's default reads in --help and the methods table: on/off for a switch,
    a spec's label, tuples space-separated; None when it is unset."""
    value = option.default
    if option.flag.switch is not TAKES_VALUE:
        return "on" if value == option.flag.switch else "off"
    if value is None:
        return None
    if hasattr(value, "describe"):
        return value.describe()
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested_class(hint) -> type | None:
    """The dataclass a field of type ``hint`` holds (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def options(cls, prefix: tuple[str, ...] = (), defaults: Any = None) -> Iterator[Option]:
    """Every flag-bearing field of ``cls``, recursing into fields that hold a settings
    dataclass by default (a method's ``spec``), in declaration order."""
    hints = _hints(cls)
    for f in fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is None:
            continue
        default = f.default if defaults is None else getattr(defaults, f.name)
        if default is MISSING:
            default = f.default_factory() if f.default_factory is not MISSING else None
        if dataclasses.is_dataclass(default) and not meta.cli:
            continue
        if dataclasses.is_dataclass(default):
            yield from options(type(default), (*prefix, f.name), default)
            continue
        if not meta.cli:
            continue
        flag = meta if meta.flag else dataclasses.replace(meta, flag=flag_of(cls, f.name))
        yield Option((*prefix, f.name), flag, default, hints[f.name])


def build(cls, given: dict[tuple[str, ...], Any]) -> Any:
    """An instance of ``cls`` with the values in ``given`` (by field path) and every other
    field at its default. A nested settings field starts from its default instance and
    takes its changes through the class's ``with_changes`` where it has one (`QuantSpec`
    uses it to keep related fields consistent), else `dataclasses.replace`."""
    values = {}
    for f in fields(cls):
        if (f.name,) in given:
            values[f.name] = given[(f.name,)]
            continue
        inner = {path[1:]: v for path, v in given.items() if path[0] == f.name and len(path) > 1}
        if inner:
            values[f.name] = _changed(f.default, inner)
    return cls(**values)


def _changed(base: Any, inner: dict[tuple[str, ...], Any]) -> Any:
    direct = {path[0]: v for path, v in inner.items() if len(path) == 1}
    deeper = {path: v for path, v in inner.items() if len(path) > 1}
    for name in {path[0] for path in deeper}:
        direct[name] = _changed(getattr(base, name), {p[1:]: v for p, v in deeper.items() if p[0] == name})
    change = getattr(base, "with_changes", None)
    return change(**direct) if change is not None else dataclasses.replace(base, **direct)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_dict(obj: Any) -> dict:
    """The dataclass ``obj`` as JSON-ready data (nested settings as dicts, tuples as lists)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.init}


def from_dict(cls, data: dict, what: str | None = None) -> Any:
    """Rebuild ``cls`` from `to_dict` output; unknown keys are refused (a newer writer)."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise SpecError(f"{what} must be a mapping of its fields, got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"{what} has unknown fields {unknown}; this lowbit reads {sorted(known)} (written by a newer lowbit? upgrade)")
    values = {}
    for name, value in data.items():
        nested = nested_class(hints[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{what}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as err:
        raise SpecError(f"{what}: {err}") from err
