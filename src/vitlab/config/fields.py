"""How a setting is declared and checked: `setting()` gives a dataclass field its default, help,
choices and valid range; `check_fields` enforces them; `field_type` and `typed` read a field's
annotation, for the command line and for values from files and checkpoints. One wording for every
refusal, whichever way a value came in.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The interval a number (or each number of a tuple) must lie in: `low` to `high`, None for no
    bound, each end closed unless marked open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None and self.low == 0:
            return "positive" if self.open_low else "0 or more"
        if self.high is None:
            return f"{'more than' if self.open_low else 'at least'} {self.low:g}"
        return (
            f"in {'(' if self.open_low else '['}{self.low:g}, "
            f"{self.high:g}{')' if self.open_high else ']'}"
        )


POSITIVE, AT_LEAST_0 = Range(0, open_low=True), Range(0)
PROBABILITY, FRACTION = Range(0, 1), Range(0, 1, open_high=True)  # [0, 1] and [0, 1)


def setting(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    valid: Range | None = None,
    **extra: Any,
) -> Any:
    """A config field: its default, the help `--help` shows, the names it may take or the range its
    numbers must lie in (`valid`), and anything else the command line or a resume needs to know of
    it (`override`: a model setting `vitlab train` can override; `resume`: "same" if a resumed run
    must keep it, "warn" if changing it on resume deserves a word)."""
    metadata = {"help": help, "choices": choices, "valid": valid, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _listed(names: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'."""
    shown = [repr(n) for n in names]
    return f"{', '.join(shown[:-1])} or {shown[-1]}"


def check_fields(config, prefix: str = "") -> None:
    """Every field of `config` among its choices and in its range, else one line naming it (`prefix`
    "--" for flags)."""
    for f in dataclasses.fields(config):
        value, choices, valid = (
            getattr(config, f.name),
            f.metadata.get("choices"),
            f.metadata.get("valid"),
        )
        if choices and value not in choices:
            raise ConfigError(f"{prefix}{f.name} must be {_listed(choices)}, got {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        if valid is not None and value is not None and not all(n in valid for n in numbers):
            raise ConfigError(f"{prefix}{f.name} must be {valid}, got {value!r}")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls, name: str) -> tuple[type, tuple, bool]:
    """A config field's annotation, resolved (the module's annotations are strings): (its type or
    generic origin, that origin's arguments, whether None is allowed). `int | None` is (int, (),
    True); `tuple[float, float]` is (tuple, (float, float), False)."""
    hint = _hints(cls)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(hint)
    if optional:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint, typing.get_args(hint), optional


# A float setting takes an int too
_ACCEPTED = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
}


def typed(cls, values: dict, what: str) -> dict:
    """`values` checked against `cls`'s fields: unknown keys and values of the wrong type refused,
    lists made tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {what}: {', '.join(unknown)}")
    typed = {}
    for name, value in values.items():
        kind, _, optional = field_type(cls, name)
        if kind in _ACCEPTED and not (value is None and optional):
            if (isinstance(value, bool) and kind is not bool) or not isinstance(
                value, _ACCEPTED[kind]
            ):
                raise ConfigError(
                    f"{name} must be {kind.__name__}{' or null' if optional else ''}, got {value!r}"
                )
        typed[name] = tuple(value) if kind is tuple and isinstance(value, list) else value
    return typed
