"""Study specs: dataclasses whose fields are a study's options, defaults and validation.

A spec field is declared once with :func:`option` (default, help text, value type, flag);
the CLI makes its options from these declarations, and the spec checks every value when
it is built, from the CLI or from Python. Values from text (flags, environment variables)
and from YAML are read by the same value types, so ``--lr nan``, ``FASTABLATE_TRAIN_LR=nan``
and ``lr: .nan`` in a config file fail alike. Nothing here imports torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Sequence

from fastablate.errors import FastablateError
from fastablate.files import parse_size

INT64_MAX = 2**63 - 1


class Value:
    """How one option's value is read and checked. ``parse`` takes text (a flag or an
    environment variable) or a YAML value and returns the typed value; ``problem`` returns
    what is wrong with a typed value, or None. Both speak of the value only; the caller names
    the option."""

    metavar = "TEXT"

    def parse(self, raw: Any) -> Any:
        return raw

    def problem(self, value: Any) -> str | None:
        return None

    def normalize(self, value: Any) -> Any:
        """The stored form of a typed value (lists become tuples)."""
        return value

    def show(self, value: Any) -> str:
        return str(value)


class Text(Value):
    def __init__(self, metavar: str = "TEXT", nonempty: bool = True):
        self.metavar, self.nonempty = metavar, nonempty

    def parse(self, raw):
        if isinstance(raw, (dict, list, tuple)) or isinstance(raw, bool):
            raise ValueError("is not a text value")
        return str(raw)

    def problem(self, value):
        if not isinstance(value, str):
            return "is not a text value"
        if self.nonempty and not value.strip():
            return "is empty"
        return None


class ModelFile(Text):
    """A checkpoint file, optionally preceded by the model it holds: ``FILE`` or ``MODEL=FILE``
    (a foreign bare state_dict needs its architecture named)."""

    def __init__(self):
        super().__init__("[MODEL=]FILE")

    @staticmethod
    def split(value: str) -> tuple[str | None, str]:
        """(model or None, file); a file whose own name holds ``=`` is taken whole when it exists."""
        import os

        name, eq, path = value.partition("=")
        if not eq or os.path.exists(value) or not name or not path:
            return None, value
        return name, path

    def files(self, value) -> list[str]:
        return [self.split(value)[1]]


class Flag(Value):
    metavar = ""

    def parse(self, raw):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("is not a yes/no value (true, false, 1, 0)")

    def problem(self, value):
        return None if isinstance(value, bool) else "is not true or false"


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _bounds(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    return f"{'<' if hi_open else '<='} {_num(hi)}"


class Int(Value):
    """A whole number (``1.9`` from YAML is an error, not 1), within [min, max]."""

    metavar = "INT"

    def __init__(self, min: int | None = None, max: int | None = INT64_MAX):
        self.min, self.max = min, max

    def parse(self, raw):
        if isinstance(raw, bool):
            raise ValueError("is not a whole number")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float):
            if raw.is_integer():
                return int(raw)
            raise ValueError("is not a whole number")
        text = str(raw).strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError("is not a whole number")
        return int(text)

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            return "is not a whole number"
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            if self.max == INT64_MAX and self.min is not None and value >= self.min:
                return f"is too large (at most {INT64_MAX})"
            return f"must be {_bounds(self.min, None if self.max == INT64_MAX else self.max, False, False)}"
        return None


class Float(Value):
    """A finite number within the bounds (``min_open``/``max_open``: the bound itself is excluded)."""

    metavar = "FLOAT"

    def __init__(self, min: float | None = None, max: float | None = None, *, min_open: bool = False,
                 max_open: bool = False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def parse(self, raw):
        if isinstance(raw, bool):
            raise ValueError("is not a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ValueError("is not a number") from None

    def problem(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not math.isfinite(value):
            return "is not a finite number"
        low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if low or high:
            return f"must be {_bounds(self.min, self.max, self.min_open, self.max_open)}"
        return None

    def show(self, value):
        return f"{value:g}" if isinstance(value, float) else str(value)


class Choice(Value):
    def __init__(self, *choices: str):
        self.choices = choices
        self.metavar = "[" + "|".join(choices) + "]"

    def parse(self, raw):
        return str(raw).strip()

    def problem(self, value):
        return None if value in self.choices else f"is not one of: {', '.join(self.choices)}"


class List(Value):
    """A comma-separated list (or a YAML list) of ``item`` values."""

    def __init__(self, item: Value, *, metavar: str | None = None):
        self.item = item
        self.metavar = metavar or f"{item.metavar},.."

    def parse(self, raw):
        parts = list(raw) if isinstance(raw, (list, tuple)) else str(raw).split(",")
        out = []
        for p in parts:
            if isinstance(p, str) and not p.strip():
                raise ValueError("has an empty item")
            try:
                out.append(self.item.parse(p.strip() if isinstance(p, str) else p))
            except ValueError as e:
                raise ValueError(f"item {p!r} {e}") from None
        return tuple(out)

    def problem(self, value):
        if not isinstance(value, (list, tuple)):
            return "is not a list"
        for v in value:
            p = self.item.problem(v)
            if p:
                return f"item {self.item.show(v)} {p}"
        return None

    def normalize(self, value):
        return tuple(value)

    def show(self, value):
        return ",".join(self.item.show(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


class NamedFiles(Value):
    """``name=FILE,name=FILE`` (or a YAML mapping): named input files."""

    metavar = "NAME=FILE,.."

    def parse(self, raw):
        if isinstance(raw, dict):
            return tuple((str(k), str(v)) for k, v in raw.items())
        out = []
        for item in str(raw).split(","):
            name, eq, path = item.strip().partition("=")
            if not eq or not name or not path:
                raise ValueError(f"has {item.strip()!r}, not name=FILE")
            out.append((name, path))
        return tuple(out)

    def problem(self, value):
        names = [n for n, _ in value]
        if len(set(names)) != len(names):
            return "names a set twice"
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
        return f"has the name {bad[0]!r}; use letters, digits, - and _" if bad else None

    def normalize(self, value):
        return tuple(tuple(v) for v in value)

    def show(self, value):
        return ",".join(f"{n}={p}" for n, p in value)

    def files(self, value) -> list[str]:
        return [p for _, p in value]


class Size(Value):
    """Bytes, written ``2G``, ``512M``, ``1.5GiB`` or ``1000000``."""

    metavar = "SIZE"

    def parse(self, raw):
        return parse_size(raw)

    def problem(self, value):
        return None if isinstance(value, int) and value >= 1 else "is not a positive size"


@dataclass(frozen=True)
class Option:
    """The CLI face of a spec field."""

    help: str
    type: Value
    flag: str  # "--noise-sigma"
    multiple: bool = False  # the flag may be repeated; the value is a tuple
    metavar: str | None = None
    cli: bool = True  # exposed as a command-line option
    role: str | None = None  # "input" or "output" for file paths: a run never writes over an input
    flag_value: Any = None  # the value of the flag given without one (``--mlflow`` alone)

    @property
    def key(self) -> str:
        """The option's name in config files and environment variables: the flag without dashes."""
        return self.flag.lstrip("-").replace("-", "_")


def option(default: Any, help: str, *, type: Value | None = None, flag: str | None = None, multiple: bool = False,
           metavar: str | None = None, cli: bool = True, role: str | None = None, flag_value: Any = None) -> Any:
    """A spec field: its default, help text, value type (inferred from the default when
    omitted) and flag (``--`` plus the field name with dashes, unless given)."""
    if type is None:
        type = Flag() if isinstance(default, bool) else Int() if isinstance(default, int) else \
            Float() if isinstance(default, float) else Text()
    meta = {"help": help, "type": type, "flag": flag, "multiple": multiple, "metavar": metavar, "cli": cli,
            "role": role, "flag_value": flag_value}
    return field(default=default, metadata={"option": meta})


def spec_options(cls) -> list[tuple[str, Option, Any]]:
    """(field name, Option, default) of every option field of a spec class, in order."""
    out = []
    for f in fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        opt = Option(meta["help"], meta["type"], meta["flag"] or "--" + f.name.replace("_", "-"), meta["multiple"],
                     meta["metavar"], meta["cli"], meta["role"], meta["flag_value"])
        out.append((f.name, opt, f.default if f.default is not MISSING else None))
    return out


def check_value(opt: Option, value: Any, source: str = "", shown: str | None = None) -> Any:
    """``value`` in its stored form, or a FastablateError naming the flag, the value (as
    ``shown``, default the value's own text) and where it came from (``source``)."""
    if value is None:
        return None
    items = tuple(value) if opt.multiple and isinstance(value, (list, tuple)) else (value,)
    for v in items:
        p = opt.type.problem(v)
        if p:
            raise FastablateError(f"{opt.flag} {shown if shown is not None else opt.type.show(v)}{source}: {p}")
    return tuple(opt.type.normalize(v) for v in items) if opt.multiple else opt.type.normalize(value)


def parse_value(opt: Option, raw: Any, source: str = "") -> Any:
    """Read ``raw`` (text or YAML) as the option's value, then check it (:func:`check_value`)."""
    if raw is None:
        return None
    raws = tuple(raw) if opt.multiple and isinstance(raw, (list, tuple)) else (raw,)
    values = []
    for r in raws:
        shown = repr(r)
        try:
            values.append(check_value(opt if not opt.multiple else _single(opt), opt.type.parse(r), source, shown))
        except ValueError as e:
            if isinstance(e, FastablateError):
                raise
            raise FastablateError(f"{opt.flag} {shown}{source}: {e}") from None
    return tuple(values) if opt.multiple else values[0]


def _single(opt: Option) -> Option:
    return replace(opt, multiple=False)


@dataclass(frozen=True)
class Spec:
    """Base of every study spec: fields declared with :func:`option`; each value is checked
    when the spec is built, then :meth:`validate` checks how the values go together."""

    def __post_init__(self):
        for name, opt, _ in spec_options(type(self)):
            object.__setattr__(self, name, check_value(opt, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise FastablateError naming the flags."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def flag(cls, name: str) -> str:
        """The flag of field ``name``."""
        return next(opt.flag for n, opt, _ in spec_options(cls) if n == name)

    def paths(self, role: str) -> list[tuple[str, str]]:
        """(flag, path) of every path given in a field of ``role`` ("input" or "output")."""
        out = []
        for name, opt, _ in spec_options(type(self)):
            value = getattr(self, name)
            if opt.role == role and value:
                values = value if opt.multiple else (value,)
                files = getattr(opt.type, "files", None)
                out += [(opt.flag, f) for v in values for f in (files(v) if files else [v])]
        return out

    def given(self) -> list[str]:
        """Names of the fields that differ from their defaults."""
        return [n for n, _, default in spec_options(type(self)) if getattr(self, n) != default]


def one_of(spec: Spec, names: Sequence[str], what: str) -> None:
    """At most one of the fields ``names`` may be given: "--a and --b both <what>: give one"."""
    given = [spec.flag(n) for n in names if getattr(spec, n) not in (None, (), False)]
    if len(given) > 1:
        raise FastablateError(f"{' and '.join(given)} {'both' if len(given) == 2 else 'each'} {what}: give one")


def applies(spec: Spec, names: Sequence[str] | str, condition: bool, to: str) -> None:
    """Fields ``names``, when given, apply only where ``condition`` holds: an option that would do
    nothing is an error, "--x applies to <to>" (for the first of them given)."""
    given = [n for n in ([names] if isinstance(names, str) else names) if n in spec.given()]
    if given and not condition:
        raise FastablateError(f"{spec.flag(given[0])} applies to {to}")


_SAME = object()


def option_of(cls, name: str, default: Any = _SAME, help: str | None = None) -> Any:
    """A field declaring option ``name`` of spec ``cls`` again, for a command that passes it on:
    the same type, so the same values are refused in the same words; ``default`` and ``help``
    where the command's differ."""
    field_name, opt, own = next(o for o in spec_options(cls) if o[0] == name)
    return option(own if default is _SAME else default, help or opt.help, type=opt.type, multiple=opt.multiple,
                  metavar=opt.metavar, role=opt.role)


def prefixed(cls, prefix: str, names: Sequence[str], help_prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Fields for ``dataclasses.make_dataclass`` that repeat options of spec ``cls`` under
    ``<prefix>_<name>`` and ``--<prefix>-<flag>``: one declaration serves two commands."""
    out = []
    for name, opt, default in spec_options(cls):
        if name in names:
            flag = f"--{prefix}-{opt.flag.lstrip('-')}"
            out.append((f"{prefix}_{name}", Any, option(default, help_prefix + opt.help, type=opt.type, flag=flag,
                                                        multiple=opt.multiple, metavar=opt.metavar, role=opt.role)))
    return out
