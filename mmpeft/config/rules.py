"""One convention for config checks: each field carries a `Rule` (type, range or choices), each section checks its
fields and adds the checks between them (`Section.cross_problems`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rule:
    """The type and range of one config value; `problem(key, value)` says what is wrong with a value, or None."""

    kind: type = int  # int, float, bool or str; an int is a float too, a bool is neither
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    choices: tuple | None = None
    optional: bool = False  # None (YAML null) allowed

    def problem(self, key: str, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"`{key}` must be set, got null."
        if self.choices is not None:
            return None if value in self.choices else f"`{key}` must be one of {list(self.choices)}, got {value!r}."
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}[self.kind]
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, self.kind) and not isinstance(value, bool)
        if ok and self.kind in (int, float) and not self._in_range(value):
            ok, name = False, f"{name} {self._range()}"
        if ok:
            return None
        return f"`{key}` must be {name}{' or null' if self.optional else ''}, got {value!r}."

    def _in_range(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


def value(default: Any, rule: Rule | None = None, **rule_args) -> Any:
    """A config field with its rule: `epochs: int = value(8, low=1)` (kind from the annotation's default type)."""
    if rule is None:
        kind = rule_args.pop("kind", type(default) if default is not None else int)
        rule = Rule(kind=kind, **rule_args)
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def choice(default: Any, choices: tuple, *, optional: bool = False) -> Any:
    return value(default, Rule(choices=choices, optional=optional))


PROBABILITY = dict(kind=float, low=0, high=1, high_open=True)


class Section:
    """A config section: each field's `Rule` is checked, nested sections check themselves, and `cross_problems`
    adds the checks between fields. Adding a key touches one class."""

    def problems(self, where: str) -> list[str]:
        """Every problem with this section's values, each naming its key (empty when all is well)."""
        found = []
        for f in dataclasses.fields(self):
            key, current = f"{where}.{f.name}" if where else f.name, getattr(self, f.name)
            rule = f.metadata.get("rule")
            if rule is not None and (problem := rule.problem(key, current)):
                found.append(problem)
            elif isinstance(current, Section):
                found += current.problems(key)
        return found + self.cross_problems(where)

    def cross_problems(self, where: str) -> list[str]:
        return []
