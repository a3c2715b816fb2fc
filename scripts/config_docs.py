"""Write docs/config.md's key tables from the schema (kvctl/config/schema.py, kvctl/sim/settings.py).

    .venv/bin/python scripts/config_docs.py

The first table under each heading of `kvctl.config.REFERENCE` is replaced; the prose around
the tables is kept. tests/test_config.py fails while the file and the schema disagree.
"""

from __future__ import annotations

from pathlib import Path

from kvctl import config

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def main() -> None:
    lines = DOC.read_text().splitlines(keepends=True)
    for heading, table in config.reference_tables().items():
        start = lines.index(heading + "\n")
        first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("| key |"))
        end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
        lines[first:end] = table.splitlines(keepends=True)
    DOC.write_text("".join(lines))


if __name__ == "__main__":
    main()
