"""The base of every method's config: flat, typed dataclasses that validate all at once.

The same dataclasses drive the Python API, YAML, CLI flags and the service's job schema, so
checking lives here once: `validate()` collects every problem and raises one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, ClassVar

from feathertune.errors import ConfigError


@dataclasses.dataclass
class MethodConfig:
    """Common behaviour of the per-method config dataclasses."""

    method: ClassVar[str] = ""  # registry name, e.g. "lora"

    def __post_init__(self) -> None:
        self.validate()

    def problems(self) -> list[str]:
        """Every problem with this config, as sentences that say how to fix it. Empty if valid."""
        return []

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, or return if there are none."""
        found = self.problems()
        if found:
            raise ConfigError(found, source=type(self).__name__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None):
        """Build a config from plain values, reporting unknown keys together with invalid values."""
        fields = {f.name for f in dataclasses.fields(cls)}
        problems = []
        for key in values:
            if key not in fields:
                hint = difflib.get_close_matches(key, sorted(fields), n=2, cutoff=0.3)
                did_you_mean = f" (did you mean {' or '.join(map(repr, hint))}?)" if hint else ""
                problems.append(f"unknown key {key!r}{did_you_mean}; "
                                f"known keys are {', '.join(sorted(fields))}")
        known = {k: v for k, v in values.items() if k in fields}
        try:
            config = cls.__new__(cls)
            for f in dataclasses.fields(cls):
                if f.name in known:
                    value = known[f.name]
                elif f.default is not dataclasses.MISSING:
                    value = f.default
                else:
                    value = f.default_factory()  # type: ignore[misc]
                object.__setattr__(config, f.name, value)
            problems += config.problems()
        except Exception as exc:  # a value so wrong that checking it failed
            problems.append(f"could not check values: {exc}")
        if problems:
            raise ConfigError(problems, source=source or cls.__name__)
        return config


def type_problem(name: str, value: Any, kinds: tuple[type, ...], wanted: str) -> list[str]:
    """A one-item list if `value` is not an instance of `kinds` (bools are not numbers here)."""
    if isinstance(value, bool) and bool not in kinds:
        return [f"{name}={value!r} must be {wanted}"]
    if not isinstance(value, kinds):
        return [f"{name}={value!r} must be {wanted}"]
    return []


def modules_problem(field: str, value: Any, *, none_means: str | None = None, allow_empty: bool = False) -> list[str]:
    """A one-item list unless `value` selects modules: a valid regex, a list of names, or (when
    `none_means` says what None stands for) None."""
    if value is None and none_means is not None:
        return []
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            return [f"{field}={value!r} is not a valid regular expression ({exc}); give a list of names"]
        return []
    if isinstance(value, (list, tuple)) and (value or allow_empty) and all(isinstance(t, str) and t for t in value):
        return []
    empty = "" if allow_empty else "non-empty "
    also = f", or None ({none_means})" if none_means is not None else ""
    return [f"{field}={value!r} must be a {empty}list of module names or a regular expression{also}"]


def positive_int(name: str, value: Any, typical: str = "") -> list[str]:
    """A one-item list unless `value` is an integer ≥ 1 (bools are not integers here)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return []
    return [f"{name}={value!r} must be a positive integer" + (f" (typical: {typical})" if typical else "")]


def names_problem(name: str, value: Any) -> list[str]:
    """A one-item list unless `value` is a list of module names (e.g. modules_to_save)."""
    if isinstance(value, (list, tuple)) and all(isinstance(m, str) and m for m in value):
        return []
    return [f"{name}={value!r} must be a list of module names, e.g. ['classifier']"]
