"""Tables that fit the terminal: rather than folding every row into fragments, optional
columns give way (the least useful first) and a dim line names them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

Cell = str | Text  # a str is rich markup


@dataclass(frozen=True)
class Column:
    header: str
    justify: Literal["left", "right"] = "left"
    # 0: always shown. Otherwise hidden when the table is too wide, highest first.
    drop: int = 0


def fit(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], width: int, **table: Any) -> RenderableType:
    """A table of `rows` no wider than `width` when hiding optional columns can make it so;
    `table` holds rich Table arguments (title, box, ...)."""
    shown = list(range(len(columns)))
    measure = Console(width=10 * width + 1000)  # rich clamps a measurement to the console's width
    while True:
        built = _build(columns, rows, shown, table)
        optional = [i for i in shown if columns[i].drop]
        if measure.measure(built).maximum <= width or not optional:
            break
        shown.remove(max(optional, key=lambda i: columns[i].drop))
    hidden = [c.header for i, c in enumerate(columns) if i not in shown]
    if not hidden:
        return built
    note = Text(f"hidden at {width} columns: {', '.join(hidden)}; a wider terminal or --json shows them", style="dim")
    return Group(built, note)


def _build(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], shown: list[int], table: dict[str, Any]) -> Table:
    result = Table(**table)
    for i in shown:
        # Only the always-shown columns may fold, and only when nothing else is left to hide.
        result.add_column(columns[i].header, justify=columns[i].justify, no_wrap=bool(columns[i].drop), overflow="fold")
    for row in rows:
        result.add_row(*(row[i] for i in shown))
    return result
