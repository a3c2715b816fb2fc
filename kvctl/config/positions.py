"""Where things are written in a kvctl.yaml node (0-based line and column), for FILE:LINE:COL."""

from __future__ import annotations

import re
from typing import Any

from ruamel.yaml.comments import CommentedMap, CommentedSeq


def pos_of(node: Any, key: str, default: tuple[int, int]) -> tuple[int, int]:
    return key_pos(node, key, default) if isinstance(node, CommentedMap) else default


def key_pos(node: CommentedMap, key: Any, default: tuple[int, int]) -> tuple[int, int]:
    """Where `key` is written in `node`; `default` when it is not (e.g. it came with a `<<:` merge)."""
    place = node.lc.data.get(key)
    return (place[0], place[1]) if place else default


def value_pos(node: CommentedMap, key: Any, default: tuple[int, int]) -> tuple[int, int]:
    place = node.lc.data.get(key)
    return (place[2], place[3]) if place else default


def port_pos(node: CommentedMap, default: tuple[int, int]) -> tuple[int, int]:
    """Where an instance sets its port: the `port:` key, else the engine_args item holding --port."""
    if "port" in node:
        return key_pos(node, "port", default)
    for key in ("engine_args", "args"):
        args = node.get(key)
        if isinstance(args, CommentedSeq):
            holding = [i for i, item in enumerate(args) if isinstance(item, str) and _PORT_FLAG.search(item)]
            if holding:
                line, col = args.lc.item(holding[-1])
                return int(line), int(col)
        if key in node:
            return value_pos(node, key, default)
    return default


_PORT_FLAG = re.compile(r"(?:^|\s)--port(?:=|\s|$)")
