"""Reading task data files: CSV, TSV and JSON Lines tables, and plain text.

Every problem of a file (not a regular file, not UTF-8, a malformed JSON line, a CSV quoting
error) is a :class:`~lora_tune.errors.ConfigError` naming the spec key, the file and the line,
never a traceback. CSV fields may be of any length.
"""
from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from lora_tune.errors import ConfigError, clip, short

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
# csv's default field limit is 131,072 characters; a long document in one cell is legitimate data.
CSV_FIELD_LIMIT = 2**31 - 1  # the largest a C long holds on every platform


def allow_long_csv_fields() -> None:
    """Raise the csv module's field size limit (process-wide; never lowered) so that a field of
    any length reads fine instead of raising ``_csv.Error: field larger than field limit``."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` is a regular file (symlinks followed); else why not, without opening it
    (opening a FIFO would wait for a writer for ever; /dev/zero never ends)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"file not found: {short(str(path))}"
    except (OSError, ValueError) as exc:
        return f"cannot read {short(str(path))}: {exc}"
    if stat.S_ISDIR(mode):
        return f"{short(str(path))} is a directory, not a file"
    if not stat.S_ISREG(mode):
        return f"{short(str(path))} is not a regular file (a FIFO, a device or a socket)"
    return None


def _require_regular_file(path: Path, field: str, allowed: str) -> None:
    problem = regular_file_problem(path)
    if problem:
        raise ConfigError(field, str(path), allowed, problem)


def first_non_utf8_line(path: str | os.PathLike) -> str | None:
    """``"line N, byte B: reason"`` for the first line of ``path`` that is not UTF-8, or None
    (read line by line: memory bounded by the longest line)."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number}, byte {exc.start + 1}: {exc.reason} (0x{line[exc.start]:02x})"
    return None


def _not_utf8(path: Path, field: str, exc: UnicodeDecodeError) -> ConfigError:
    try:
        where = first_non_utf8_line(path) or exc.reason
    except OSError:
        where = exc.reason
    return ConfigError(field, str(path), "a UTF-8 text file", f"not UTF-8 at {where}")


def json_lines(fh: Any, path: Path, field: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line; ConfigError at the first bad line."""
    allowed = "a JSON Lines file (one JSON object a line)"
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(field, str(path), allowed, f"line {number}, column {exc.colno}: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # an integer of 5000 digits, nesting too deep
            raise ConfigError(field, str(path), allowed,
                              f"line {number}: {clip(str(exc) or type(exc).__name__, 200)}") from None
        if not isinstance(row, dict):
            raise ConfigError(field, str(path), allowed, f"line {number} is {type(row).__name__} "
                              f"{short(row, 60)}, not an object")
        yield number, row


def _csv_rows(fh: Any, path: Path, field: str, delimiter: str) -> list[dict[str, Any]]:
    allow_long_csv_fields()
    reader = csv.DictReader(fh, delimiter=delimiter)
    try:
        return list(reader)
    except csv.Error as exc:
        raise ConfigError(field, str(path), f"a {'TSV' if delimiter == chr(9) else 'CSV'} file",
                          f"line {reader.line_num}: {clip(str(exc), 200)}") from None


def read_columns(path: str | Path, field: str = "task.train_file") -> list[str]:
    """Column names of a table file (the CSV/TSV header, the keys of the first JSON line)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    _require_regular_file(path, field, "a .csv, .tsv or .jsonl file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            if suffix == ".jsonl":
                for _number, row in json_lines(fh, path, field):
                    return list(row)
                return []
            allow_long_csv_fields()
            reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            try:
                return next(reader, [])
            except csv.Error as exc:
                raise ConfigError(field, str(path), "a CSV or TSV file",
                                  f"line {reader.line_num}: {clip(str(exc), 200)}") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, field, exc) from None


def read_table(path: str | Path, columns: list[str], field: str) -> list[dict[str, Any]]:
    """Rows of a table file holding at least ``columns``; ConfigError naming ``field`` otherwise."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ConfigError(field, str(path), "a .csv, .tsv or .jsonl file")
    _require_regular_file(path, field, "a .csv, .tsv or .jsonl file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            if suffix == ".jsonl":
                rows = [row for _number, row in json_lines(fh, path, field)]
            else:
                rows = _csv_rows(fh, path, field, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, field, exc) from None
    except OSError as exc:
        raise ConfigError(field, str(path), "a readable .csv, .tsv or .jsonl file", str(exc)) from None
    for number, row in enumerate(rows, 1):
        for column in columns:
            if row.get(column) is None:
                raise ConfigError(field, str(path), f"rows with the columns {columns}",
                                  f"row {number} has no value for {short(column)}")
    return rows


def read_text(paths: str | Path | list, field: str) -> str:
    """The contents of one or more UTF-8 text files, joined by a blank line."""
    items = paths if isinstance(paths, (list, tuple)) else [paths]
    parts = []
    for item in items:
        path = Path(item).expanduser()
        _require_regular_file(path, field, "a readable UTF-8 text file")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, field, exc) from None
        except OSError as exc:
            raise ConfigError(field, str(item), "a readable UTF-8 text file", str(exc)) from None
    return "\n\n".join(parts)
