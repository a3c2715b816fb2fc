"""Reading kvctl.yaml's text into a YAML tree, within the loader's limits (docs/config.md).

Limits are checked before anything expensive: the size before parsing, long lines before
scanning, depth and alias expansion while composing. YAML errors become FILE:LINE:COL
problems in words.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning
from ruamel.yaml.events import MappingStartEvent, ScalarEvent, SequenceStartEvent
from ruamel.yaml.nodes import MappingNode, SequenceNode

from kvctl.errors import ConfigError
from kvctl.settings import clip

DEFAULT_PATH = "kvctl.yaml"
# a real kvctl.yaml is a few KiB, a few levels deep
MAX_FILE_BYTES = 1024 * 1024
MAX_LINE_CHARS = 16 * 1024
MAX_DEPTH = 32
MAX_VALUES = 100_000


def resolve_path(path: str | os.PathLike[str] | None) -> Path:
    """-c/--config, then $KVCTL_CONFIG, then ./kvctl.yaml."""
    chosen = path or os.environ.get("KVCTL_CONFIG") or DEFAULT_PATH
    return Path(chosen).expanduser().absolute()


def read_text(file: Path) -> str:
    """The file's text; at most MAX_FILE_BYTES are ever read."""
    try:
        with file.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)  # never more: the size is checked before parsing
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError([_too_big(file)])
        return raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such config file (use -c PATH or set KVCTL_CONFIG)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc}"]) from None


def load_yaml(text: str, file: Path) -> Any:
    """The YAML tree of `text` (ruamel round-trip nodes, which know their positions)."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError([_too_big(file)])
    long_line = next((i for i, line in enumerate(text.splitlines()) if len(line) > MAX_LINE_CHARS), None)
    if long_line is not None:
        # ruamel scans some long lines (a comment after a value) in quadratic time.
        raise ConfigError([f"{file}:{long_line + 1}:{MAX_LINE_CHARS + 1}: line {long_line + 1} is longer than {MAX_LINE_CHARS} characters"])
    yaml = YAML(typ="rt")
    yaml.Composer = _GuardedComposer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReusedAnchorWarning)  # YAML allows redefining an anchor
            return yaml.load(text)
    except MarkedYAMLError as exc:
        (line, col), problem = _yaml_problem(exc, text)
        raise ConfigError([f"{file}:{line + 1}:{col + 1}: {problem}"]) from None


def _too_big(file: Path) -> str:
    return f"{file}: the config file is larger than {MAX_FILE_BYTES // 1024} KiB (a kvctl.yaml needs a few KiB)"


class _LimitError(MarkedYAMLError):
    """The file breaks one of the loader's limits (its message needs no "YAML syntax error")."""


class _GuardedComposer(Composer):
    """ruamel's composer, bounded before anything recurses deeply or expands aliases:
    nesting depth, the number of values with every alias expanded, plain mapping keys."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self._level = 0
        self._sizes: dict[int, int] = {}  # id(collection node) -> values in it, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(parent, MappingNode) and index is None and not isinstance(event, ScalarEvent):
            # An alias of a list as a key is unhashable; kvctl never needs a non-scalar key.
            raise _LimitError(None, None, "a mapping key must be a plain value, not an alias, a list or a mapping", event.start_mark)
        collection = isinstance(event, (SequenceStartEvent, MappingStartEvent))
        if collection and self._level >= MAX_DEPTH:
            raise _LimitError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._level += collection
        try:
            node = super().compose_node(parent, index)
        finally:
            self._level -= collection
        if collection:
            children = node.value if isinstance(node, SequenceNode) else [child for pair in node.value for child in pair]
            size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
            if size > MAX_VALUES:
                raise _LimitError(None, None, f"this expands to more than {MAX_VALUES} values (each use of a YAML alias counts)", event.start_mark)
            self._sizes[id(node)] = size
        return node


def _yaml_problem(exc: MarkedYAMLError, text: str) -> tuple[tuple[int, int], str]:
    """ruamel's error as a position and a message in words (indentation mistakes named as such)."""
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line, mark.column) if mark else (0, 0)
    problem = str(exc.problem or exc.context or "invalid YAML")
    if isinstance(exc, _LimitError):
        return (line, col), problem
    lines = text.splitlines()
    here = lines[line] if line < len(lines) else ""
    key = _KEY_LINE.match(here)
    # A key indented differently from its neighbours: ruamel sees a scalar continued by a
    # stray ':' (deeper) or a block that ends where none can (shallower).
    if key and (
        (problem.startswith("expected <block end>") and col == key.start(2)) or (problem == "mapping values are not allowed here" and col == key.end(3))
    ):
        return (line, key.start(3)), _misaligned(lines, line, key)
    if problem == "mapping values are not allowed here":
        return (line, col), "YAML syntax error: ': ' inside a value (quote the value)"
    if problem == "could not find expected ':'" and exc.context_mark:
        return (exc.context_mark.line, exc.context_mark.column), "YAML syntax error: a line in a mapping without 'key: value' (missing ':'?)"
    if "'\\t'" in problem:
        return (line, col), "YAML syntax error: a tab character; YAML indents with spaces only"
    if "duplicate key" in problem:
        problem = problem.split(" with value")[0]
    return (line, col), f"YAML syntax error: {clip(problem, 120)}"


# `  - key: value`: group 1 the indentation, 2 the item/key start, 3 the key.
_KEY_LINE = re.compile(r"^( *)((?:- +)*)([^\s#:-][^#:]*?) *:(?:\s|$)")


def _misaligned(lines: list[str], line: int, key: re.Match[str]) -> str:
    own = f"bad indentation: '{clip(key.group(3), 40)}' (column {key.start(3) + 1})"
    for above in range(line - 1, -1, -1):
        prev = _KEY_LINE.match(lines[above])
        if prev:
            return f"{own} is not aligned with '{clip(prev.group(3), 40)}' (column {prev.start(3) + 1}) on line {above + 1}"
    return f"{own} does not match the indentation of the lines above"
