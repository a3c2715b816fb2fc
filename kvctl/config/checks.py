"""Checks of kvctl.yaml values that need the reader: ${VAR} expansion, paths relative to the
file, positions of list items, nested sections.

Plain checks are kvctl.settings' Bool, Number, Integer and Choice. Each check reports through
`reader.error` (FILE:LINE:COL) and returns INVALID for a value it refuses.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq

from kvctl import engines
from kvctl.config.positions import key_pos, value_pos
from kvctl.settings import INVALID, Convert, Integer, Number, Pos, Setting, clip, describe, quote

if TYPE_CHECKING:
    from kvctl.config.reader import Reader

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VAR_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def _expand(reader: Reader, value: str, pos: Pos) -> str | object:
    """Replace ${VAR} from the environment; an unset or malformed one is an error."""
    bad = False

    def sub(match: re.Match[str]) -> str:
        nonlocal bad
        name = match.group(1)
        if not _ENV_KEY.match(name):
            reader.error(pos, f"'${{{clip(name)}}}' is not a valid environment variable reference")
            bad = True
            return ""
        if name not in os.environ:
            reader.error(pos, f"environment variable '{clip(name)}' is not set")
            bad = True
            return ""
        return os.environ[name]

    result = VAR_REFERENCE.sub(sub, value)
    return INVALID if bad else result


def _string(reader: Reader, value: Any, pos: Pos) -> Any:
    if not isinstance(value, str):
        reader.error(pos, f"expected a string, got {describe(value)}")
        return INVALID
    return _expand(reader, value, pos)


def nonempty_string(reader: Reader, value: Any, pos: Pos) -> Any:
    result = _string(reader, value, pos)
    if result == "":
        reader.error(pos, "must not be empty")
        return INVALID
    return result


port = Integer(1, 65535)


def memory_gb(reader: Reader, value: Any, pos: Pos) -> Any:
    """A number of GB, or `auto`: measured per engine process through NVML, which must be there."""
    if value != "auto":
        return Number(positive=True, optional=True)(reader, value, pos)
    from kvctl import gpu

    reason = gpu.unavailable_reason()
    if reason is not None:
        reader.error(pos, f"'auto' needs each engine's GPU memory from NVML, which is not available here ({reason}); give a number of GB")
        return INVALID
    return value


def engine_name(reader: Reader, value: Any, pos: Pos) -> Any:
    try:
        return engines.engine_name(value)
    except ValueError as exc:
        reader.error(pos, str(exc))
        return INVALID


def path(reader: Reader, value: Any, pos: Pos) -> Any:
    text = nonempty_string(reader, value, pos)
    if text is INVALID:
        return INVALID
    # abspath, not resolve(): a venv's bin/python is a symlink, and following it would
    # run the base interpreter outside the venv.
    return Path(os.path.abspath(reader.file.parent / Path(text).expanduser()))


def list_of(item_convert: Convert) -> Convert:
    def convert(reader: Reader, value: Any, pos: Pos) -> Any:
        if not isinstance(value, CommentedSeq):
            reader.error(pos, f"expected a list of strings, got {describe(value)}")
            return INVALID
        out = []
        for index, item in enumerate(value):
            converted = item_convert(reader, item, value.lc.item(index))
            if converted is not INVALID:
                out.append(converted)
        return tuple(out)

    return convert


def secret(reader: Reader, value: Any, pos: Pos) -> Any:
    """An API key or admin token; messages never show it."""
    text = _string(reader, value, pos)
    if text is not INVALID and (not text or any(ch.isspace() or not ch.isprintable() for ch in text)):
        # Clients send it as `Authorization: Bearer KEY`: blank or spaced keys can never match.
        reader.error(pos, "must not be empty or contain spaces or control characters")
        return INVALID
    return text


def optional_secret(reader: Reader, value: Any, pos: Pos) -> Any:
    return None if value is None else secret(reader, value, pos)


def engine_args(reader: Reader, value: Any, pos: Pos) -> Any:
    """A string or a list; each item is split like a shell word list (never run by a shell)."""
    items: list[tuple[Any, Pos]]
    if isinstance(value, str):
        items = [(value, pos)]
    elif isinstance(value, CommentedSeq):
        items = [(item, value.lc.item(i)) for i, item in enumerate(value)]
    else:
        reader.error(pos, f"expected a string or a list of strings, got {describe(value)}")
        return INVALID
    out: list[str] = []
    for item, item_pos in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        text = _string(reader, item, item_pos)
        if text is INVALID:
            continue
        try:
            words = shlex.split(text)
        except ValueError as exc:
            reader.error(item_pos, f"cannot split engine argument {quote(text)}: {exc}")
            continue
        for word in words:
            if "\n" in word or "\r" in word or "\0" in word:
                reader.error(item_pos, f"engine argument {quote(word)} contains a newline or NUL")
            else:
                out.append(word)
    return out


def _env_value(reader: Reader, value: Any, pos: Pos) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    text = _string(reader, value, pos)
    if text is not INVALID and "\0" in text:
        reader.error(pos, "environment values cannot contain NUL")
        return INVALID
    return text


def environment(reader: Reader, value: Any, pos: Pos) -> Any:
    """`["KEY=VALUE", ...]` or a mapping."""
    out: dict[str, str] = {}
    if isinstance(value, CommentedSeq):
        for index, item in enumerate(value):
            item_pos = value.lc.item(index)
            if not isinstance(item, str) or "=" not in item:
                reader.error(item_pos, f"expected 'KEY=VALUE', got {quote(item)}")
                continue
            key, _, raw = item.partition("=")
            converted = _env_value(reader, raw, item_pos)
            if not _ENV_KEY.match(key):
                reader.error(item_pos, f"'{clip(str(key))}' is not a valid environment variable name")
            elif converted is not INVALID:
                out[key] = converted
    elif isinstance(value, CommentedMap):
        for key in value:
            if not isinstance(key, str) or not _ENV_KEY.match(key):
                reader.error(key_pos(value, key, pos), f"'{clip(str(key))}' is not a valid environment variable name")
                continue
            converted = _env_value(reader, value[key], value_pos(value, key, pos))
            if converted is not INVALID:
                out[key] = converted
    elif value is not None:
        reader.error(pos, f"expected a list of 'KEY=VALUE' strings or a mapping, got {describe(value)}")
        return INVALID
    return out


def kvcached_block(reader: Reader, value: Any, pos: Pos) -> Any:
    """The kvcached block: keys upper-cased into every engine's environment."""
    if value is None:
        return {}
    if not isinstance(value, CommentedMap):
        reader.error(pos, f"expected a mapping, got {describe(value)}")
        return INVALID
    env = environment(reader, value, pos)
    return {key.upper(): val for key, val in env.items()}


def section(where: str, fields: dict[str, Setting]) -> Convert:
    def convert(reader: Reader, value: Any, pos: Pos) -> Any:
        return reader.mapping(value, pos, where, fields)

    return convert
