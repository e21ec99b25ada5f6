"""Config field checks: one line per problem, naming the dotted field, what was expected and what was given.

Every config section declares its fields' rules once (`{"lr": POSITIVE, "arch": one_of(ARCHS)}`) and
`field_problems` turns them into the lines `ConfigError` shows, so the wording is the same everywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    expected: str  # "must be > 0": the message's middle part
    holds: Callable[[Any], bool]
    quote: bool = False  # show the given value in quotes (names rather than numbers)

    def or_null(self, meaning: str) -> Rule:
        """The same rule, with None also allowed (`meaning` says what None does)."""
        return Rule(f"{self.expected} or null ({meaning})", lambda v: v is None or self.holds(v), self.quote)


POSITIVE = Rule("must be > 0", lambda v: v > 0)
NON_NEGATIVE = Rule("must be >= 0", lambda v: v >= 0)
AT_LEAST_ONE = Rule("must be >= 1", lambda v: v >= 1)
COUNT = Rule("must be >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
UNIT_CLOSED = Rule("must be in [0, 1]", lambda v: 0 <= v <= 1)
UNIT_HALF_OPEN = Rule("must be in [0, 1)", lambda v: 0 <= v < 1)
UNIT_OPEN = Rule("must be in (0, 1)", lambda v: 0 < v < 1)
# MLflow's model registry refuses empty names and names with '/' or ':'.
MODEL_NAME = Rule("expected a model registry name (text without '/' or ':')",
                  lambda v: isinstance(v, str) and v.strip() != "" and not set(v) & {"/", ":"}, quote=True)


def one_of(options: Sequence[str]) -> Rule:
    return Rule(f"expected one of {', '.join(options)}", lambda v: v in options, quote=True)


def field_problems(section: str, cfg: Any, rules: dict[str, Rule]) -> list[str]:
    """`section.field: expected..., got value` for every field of `cfg` that breaks its rule."""
    problems = []
    for name, rule in rules.items():
        value = getattr(cfg, name)
        try:
            ok = bool(rule.holds(value))
        except TypeError:  # a value of the wrong type (e.g. a string where a number belongs)
            ok = False
        if not ok:
            shown = f"'{value}'" if rule.quote else value
            problems.append(f"{section}.{name}: {rule.expected}, got {shown}")
    return problems
