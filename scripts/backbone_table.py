"""Writes the README's backbone table from the registry (parameters and MACs counted from the
models built without weights, as `tlapp backbones` does).

usage: python scripts/backbone_table.py            # print the Markdown table
       python scripts/backbone_table.py README.md  # replace the table between its markers
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

START, END = "<!-- backbone-table: scripts/backbone_table.py -->", "<!-- /backbone-table -->"


def markdown_table() -> str:
    from tlapp.reporting.tables import registry_rows

    header, *rows = registry_rows()
    lines = ["| backbone | default size | parameters | MACs/image | features | preprocessing "
             "| random init |", "|---|---:|---:|---:|---:|---|---|"]
    for name, params, macs, size, features, preprocess, collapse in rows:
        lines.append(f"| {name} | {size} | {params} | {macs} | {features} | {preprocess} "
                     f"| {collapse} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    table = markdown_table()
    if not argv:
        print(table)
        return 0
    path = Path(argv[0])
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"{path} has no {START} ... {END} markers")
    path.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
