"""Reading task data files: CSV, TSV and JSON Lines tables, and plain text."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lora_tune.errors import ConfigError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def read_columns(path: str | Path) -> list[str]:
    """Column names of a table file (the CSV/TSV header, the keys of the first JSON line)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as fh:
        if suffix == ".jsonl":
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    return list(row) if isinstance(row, dict) else []
            return []
        reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        return next(reader, [])


def read_table(path: str | Path, columns: list[str], field: str) -> list[dict[str, Any]]:
    """Rows of a table file holding at least ``columns``; ConfigError naming ``field`` otherwise."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ConfigError(field, str(path), "a .csv, .tsv or .jsonl file")
    rows: list[dict[str, Any]] = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            if suffix == ".jsonl":
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ConfigError(field, str(path), "a JSON Lines file (one JSON object a line)",
                                          f"line {number}: {exc.msg}") from None
                    if not isinstance(row, dict):
                        raise ConfigError(field, str(path), "a JSON Lines file of objects", f"line {number} is not an object")
                    rows.append(row)
            else:
                rows = list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as exc:
        raise ConfigError(field, str(path), "a UTF-8 text file", str(exc)) from None
    for number, row in enumerate(rows, 1):
        for column in columns:
            if row.get(column) is None:
                raise ConfigError(field, str(path), f"rows with the columns {columns}",
                                  f"row {number} has no value for {column!r}")
    return rows


def read_text(paths: str | Path | list, field: str) -> str:
    """The contents of one or more UTF-8 text files, joined by a blank line."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    parts = []
    for item in items:
        try:
            parts.append(Path(item).expanduser().read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(field, str(item), "a readable UTF-8 text file", str(exc)) from None
    return "\n\n".join(parts)
