"""feathertune's exceptions: each says what was given, what is allowed, and how to fix it."""

from __future__ import annotations


class FeathertuneError(Exception):
    """Base class of every error feathertune raises on purpose."""


class ConfigError(FeathertuneError, ValueError):
    """A configuration is invalid. `problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[str] | str, source: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source} has {len(self.problems)} {noun}:\n{lines}")


class TargetError(ConfigError):
    """`target_modules` (or `modules_to_save`) matched nothing usable in the model."""

    def __init__(self, message: str, source: str = "target_modules"):
        super().__init__([message], source=source)


class AdapterMismatchError(FeathertuneError):
    """An adapter file does not fit the model it is loaded onto (names or shapes differ)."""


class UnsupportedAdapterError(FeathertuneError):
    """An adapter file uses something feathertune does not implement; loading it would be wrong."""


class DataError(FeathertuneError, ValueError):
    """A data file has bad examples. `problems` lists them all (up to a cap), each as
    'path:line: field: what is wrong', so that one run of the validator fixes a whole file."""

    def __init__(self, problems: list[str], path: str = "", total: int | None = None):
        self.problems = list(problems)
        self.path = path
        total = len(self.problems) if total is None else total
        more = f"\n  … and {total - len(self.problems)} more" if total > len(self.problems) else ""
        noun = "problem" if total == 1 else "problems"
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{total} {noun} in the data:\n" + "\n".join(f"  {p}" for p in self.problems) + more)
