"""A setting is declared once: a dataclass field whose metadata says how a value is checked
and what the reference says about it.

From those fields come the key tables kvctl.yaml is read against (kvctl/config/schema.py), the
simulated engine's command-line flags (kvctl/sim/__main__.py and the sim adapter's command
line) and the tables of docs/config.md (`reference_table`, kept in step by a test).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Pos = tuple[int, int]  # (line, column), 0-based, of a value in the file
INVALID = object()  # a converter's result when it reported a problem


class Reporter(Protocol):
    def error(self, pos: Pos, message: str) -> None: ...


Convert = Callable[[Any, Any, Pos], Any]  # (reader, value, pos) -> the value, or INVALID once reported


@dataclass(frozen=True)
class Setting:
    """One key: its check, what the reference says, and where the value goes."""

    convert: Convert
    doc: str
    key: str | None = None  # the file's key, when it is not the attribute's name
    type_text: str | None = None  # the reference's type column, when the check cannot say it
    default_text: str | None = None  # the reference's default column, when the default does not say it
    attr: str | None = None  # the dataclass attribute (set by `fields_of`)
    default: Any = field(default_factory=lambda: dataclasses.MISSING)  # MISSING: required

    def type_doc(self) -> str:
        if self.type_text is not None:
            return self.type_text
        if not isinstance(self.convert, Kind):
            raise TypeError(f"setting {self.key or self.attr}: give type_text, its check cannot describe itself")
        return self.convert.text()

    def default_doc(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return "required" if self.default is dataclasses.MISSING else _literal(self.default)


_META = "kvctl.setting"


def setting(default: Any, convert: Convert, doc: str, *, key: str | None = None, type_text: str | None = None, default_text: str | None = None) -> Any:
    """A dataclass field declared as a setting (`default` MISSING: the key is required)."""
    meta = {_META: Setting(convert, doc, key=key, type_text=type_text, default_text=default_text)}
    return field(metadata=meta) if default is dataclasses.MISSING else field(default=default, metadata=meta)


def fields_of(cls: type) -> dict[str, Setting]:
    """The file's key -> its Setting, for every field of `cls` declared with `setting`, in order."""
    table: dict[str, Setting] = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META)
        if spec is not None:
            table[spec.key or f.name] = dataclasses.replace(spec, attr=f.name, default=f.default)
    return table


def reference_table(table: dict[str, Setting], aliases: dict[str, str] | None = None) -> str:
    """The Markdown table docs/config.md shows for a section (`aliases`: other name -> key)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, spec in table.items():
        names = f"`{key}`" + "".join(f" (alias `{alias}`)" for alias, target in (aliases or {}).items() if target == key)
        rows.append(f"| {names} | {spec.type_doc()} | {spec.default_doc()} | {spec.doc} |")
    return "\n".join(rows) + "\n"


def _literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if value == ():
        return "`[]`"
    return f"`{value}`"


# --------------------------------------------------------------------------- plain values


class Kind:
    """A check on a plain value (no ${VAR}, no position of its own), which the reference and
    command-line flags understand too."""

    optional: bool = False

    def text(self) -> str:
        """The reference's type column."""
        raise NotImplementedError

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None."""
        raise NotImplementedError

    def cast(self, value: Any) -> Any:
        return value

    def __call__(self, reader: Reporter, value: Any, pos: Pos) -> Any:
        if value is None and self.optional:
            return None
        problem = self.problem(value)
        if problem is not None:
            reader.error(pos, problem)
            return INVALID
        return self.cast(value)

    # -- as a command-line flag
    def flag_options(self) -> dict[str, Any]:
        """argparse keyword arguments of the flag that carries this value."""
        return {"type": self.from_text, "metavar": "N"}

    def flag_args(self, flag: str, value: Any) -> list[str]:
        """The command-line words that pass `value`."""
        return [flag, str(value)]

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        """A flag's text as a checked value (argparse's `type`): it says why it is not one."""
        import argparse  # only ever called by a parser, which has imported it

        try:
            value = self.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.text()}, got {text!r}") from None
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return self.cast(value)


class Bool(Kind):
    def text(self) -> str:
        return "bool"

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"expected true or false, got {describe(value)}"

    def flag_options(self) -> dict[str, Any]:
        return {"action": "store_true"}

    def flag_args(self, flag: str, value: Any) -> list[str]:
        return [flag] if value else []


@dataclass(frozen=True)
class Number(Kind):
    minimum: float = 0.0
    positive: bool = False
    maximum: float | None = None
    optional: bool = False

    def text(self) -> str:
        if self.maximum is not None:
            return f"number {self.minimum:g}–{self.maximum:g}"
        return "number > 0" if self.positive else f"number ≥ {self.minimum:g}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {describe(value)}"
        if (self.positive and value <= 0) or value < self.minimum or (self.maximum is not None and value > self.maximum):
            bound = "greater than 0" if self.positive else f"at least {self.minimum}"
            if self.maximum is not None:
                bound += f" and at most {self.maximum}"
            return f"must be {bound}, got {value}"
        return None

    def cast(self, value: Any) -> Any:
        return float(value)

    def parse(self, text: str) -> Any:
        return float(text)


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int = 0
    maximum: int | None = None
    optional: bool = False

    def text(self) -> str:
        return f"integer {self.minimum}…{self.maximum}".replace("-", "−") if self.maximum is not None else f"integer ≥ {self.minimum}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an integer, got {describe(value)}"
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            return (
                f"must be between {self.minimum} and {self.maximum}, got {value}"
                if self.maximum is not None
                else f"must be at least {self.minimum}, got {value}"
            )
        return None

    def cast(self, value: Any) -> Any:
        return int(value)

    def parse(self, text: str) -> Any:
        return int(text)


class Choice(Kind):
    def __init__(self, *choices: Any, optional: bool = False) -> None:
        self.choices = choices
        self.optional = optional

    def text(self) -> str:
        return ", ".join(f"`{choice}`" for choice in self.choices)

    def problem(self, value: Any) -> str | None:
        return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}, got {quote(value)}"

    def flag_options(self) -> dict[str, Any]:
        return {"choices": self.choices, "type": type(self.choices[0])}


# --------------------------------------------------------------------------- a user's value in a message


def describe(value: Any) -> str:
    """What kind of value the user wrote ("a string", "a list", ...)."""
    if value is None:
        return "nothing"
    for kind, words in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a mapping"), (list, "a list")):
        if isinstance(value, kind):
            return words
    return type(value).__name__


def clip(text: str, limit: int = 60) -> str:
    """At most `limit` characters of a user's text in a message."""
    return text if len(text) <= limit else text[:limit] + "…"


def quote(value: Any) -> str:
    """A user's value in a message: a short prefix of text, only the kind of anything bigger."""
    if isinstance(value, str):
        return repr(clip(value))
    if isinstance(value, (bool, int, float)):
        return repr(value)
    return describe(value)
