"""Typed options: dataclass fields that carry their help text, allowed values and bounds, the
check that holds a value to them, and the command-line flags made from them.

A field's flat name is its flag without the dashes and the name errors use: the field's own name
unless `option(flat=...)` gives another (the gradient section's `bits` is `grad_bits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    flat: str | None = None,
    words: tuple[str, ...] = (),
) -> Any:
    """A config field with its help text, allowed values, numeric bounds (`above`: an exclusive
    lower bound), flat name (default: the field's name) and `words` a number field also takes
    (grad_bits: auto)."""
    meta = {
        "help": help,
        "choices": choices,
        "min": minimum,
        "max": maximum,
        "above": above,
        "flat": flat,
        "words": words,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclasses.dataclass
class Options:
    """A dataclass of `option` fields, each checked when it is built; `check` adds the rules
    that tie fields together."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check(flat_name(f), getattr(self, f.name), hints[f.name], f.metadata)
        self.check()

    def check(self) -> None:
        """Raise ConfigError where fields disagree (none here)."""

    def as_kwargs(self) -> dict[str, Any]:
        """The fields by name: the keyword arguments of the constructor this section feeds."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def flat_name(f: dataclasses.Field) -> str:
    """The name flags, flat YAML keys and errors give the field."""
    return f.metadata.get("flat") or f.name


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a field's hint: `int | None` -> (int, True); the
    first type of a union (`int | str | None`: a number field that takes `words`) -> int."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _check(name: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> None:
    """Raise ConfigError unless `value` has the field's type, is among its choices and in bounds."""
    base, optional = _unwrap(hint)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must not be null")
    words = meta.get("words", ())
    if isinstance(value, str) and words:
        if value not in words:
            raise ConfigError(f"{name}={value!r}: expected {base.__name__} or {', '.join(words)}")
        return
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if not (isinstance(value, list) and all(_is(v, item) for v in value)):
            raise ConfigError(f"{name}={value!r}: expected a list of {_NAMES[item]}")
        return
    if not _is(value, base):
        raise ConfigError(f"{name}={value!r}: expected {base.__name__}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {_bounds(meta)}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(meta['choices'])}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{name}={value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{name}={value!r} is above the maximum {meta['max']}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: above {meta['above']}")


_NAMES = {str: "strings", int: "integers"}


def _is(value: Any, kind: type) -> bool:
    """Whether `value` is a `kind` (bool, int, float or str) as a config reads it: a bool is no
    number, an int is a float."""
    return {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    """A float field's allowed values in words: "a finite number in [0, 0.99]"."""
    low, high = meta.get("min"), meta.get("max")
    if meta.get("above") is not None:
        return f"a finite number above {meta['above']}"
    if low is not None and high is not None:
        return f"a finite number in [{low}, {high}]"
    if low is not None:
        return f"a finite number >= {low}"
    return "a finite number" if high is None else f"a finite number <= {high}"


def add_flags(parser: argparse._ActionsContainer, section: type[Options]) -> None:
    """One --flag per field of `section` (its flat name, underscores as dashes); a flag that is
    not given leaves no attribute, so a YAML file's value stands."""
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        flag = "--" + flat_name(f).replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shared = {
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} (default: {default})",
        }
        base, optional = _unwrap(hints[f.name])
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **shared)
        elif typing.get_origin(base) is list:
            item = _parser_for(typing.get_args(base)[0], False)
            parser.add_argument(flag, nargs="*", type=item, **shared)
        else:
            choices = f.metadata["choices"]
            metavar = "{" + ",".join(choices) + "}" if choices else base.__name__.upper()
            words = f.metadata.get("words", ())
            parse = _parser_for(base, optional, words)
            parser.add_argument(flag, type=parse, metavar=metavar, **shared)


def _parser_for(
    kind: type, optional: bool, words: tuple[str, ...] = ()
) -> typing.Callable[[str], Any]:
    """Parse a flag's text as `kind`; 'none'/'null' mean None for optional fields, `words`
    stand for themselves."""

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None

    return parse
