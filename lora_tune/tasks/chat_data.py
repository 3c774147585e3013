"""Instruction data for the ``sft`` task: reading files, the three formats, and label masks.

Formats (``task.format``; detected from the columns when omitted, in this order):

``messages``
    a column of conversations ``[{role, content}, ...]``; roles :data:`ROLES`.
``prompt-completion``
    two string columns; the prompt becomes one user turn when there is a chat template.
``text``
    one string column; every token is supervised.

**Label masks.** An example is rendered once and tokenized with character offsets; a token is
supervised when its first character lies in an assistant span: from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``,
i.e. the content and the end-of-turn marker exactly as the template writes them. A turn the full
rendering writes differently (EOS after the last turn only, reasoning dropped from the history)
ends where the two renderings' tokens part, if that covers the content, else is its content
string alone (:attr:`Split.content_only_turns`). A template with ``{% generation %}`` blocks
decides itself (Hugging Face's ``return_assistant_tokens_mask``). Without a template, a
prompt-completion example is ``prompt + completion`` + EOS. The first label is always ``-100``
(in a packed block it would be predicted from the previous example).
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

from lora_tune.errors import ConfigError, clip, short
from lora_tune.tasks.base import cache_dir
from lora_tune.tasks.data_files import allow_long_csv_fields, first_non_utf8_line, json_lines, regular_file_problem

FORMATS = ("messages", "prompt-completion", "text")
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("completion", "all")
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
EVAL_SPLITS = ("validation", "eval", "test")
IGNORE = -100
# How transformers tells a template with generation blocks (utils/chat_template_utils.py).
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Columns:
    """Column names of the data files (``task.*_column``)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"

    def needed(self, fmt: str) -> dict[str, str]:
        """``{spec key: column}`` that ``fmt`` reads."""
        if fmt == "messages":
            return {"messages_column": self.messages}
        if fmt == "prompt-completion":
            return {"prompt_column": self.prompt, "completion_column": self.completion}
        return {"text_column": self.text}


@dataclass(frozen=True)
class Table:
    """The rows of one data file, with where they came from (for error messages)."""

    source: str
    field: str  # "task.train_file" or "task.eval_file"
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class Example:
    """One rendered, tokenized example. ``prompt_ids`` / ``reference`` feed generation metrics
    (the conversation up to its last assistant message, and that message); None for ``text``."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None
    reference: str | None = None

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class Split:
    """The examples of a split that fit ``max_length``, and what was left out."""

    examples: list[Example] = field(default_factory=list)
    too_long: int = 0
    content_only_turns: int = 0


# -- reading --------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets`` offline and without progress bars or info logs, restoring its settings."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    level = datasets.utils.logging.get_verbosity()
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # read_table reports every error itself
    datasets.utils.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.utils.logging.set_verbosity(level)
        if bars:
            datasets.utils.enable_progress_bars()


def check_data_path(value: Any) -> str | None:
    """None when ``value`` is a data file with a known suffix or a ``save_to_disk`` directory."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        return f"must be a data file path, got {short(value)}"
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return f"directory {str(path)!r} is not a datasets save_to_disk directory"
        return None
    if not path.is_file():  # missing, a FIFO, a device
        return regular_file_problem(path) or f"file not found: {short(str(path))}"
    if path.suffix.lower() not in DATA_SUFFIXES:
        return (f"{str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(DATA_SUFFIXES)} "
                "or a save_to_disk directory")
    return None


def read_table(source: str, field: str) -> Table:
    """Rows of a data file (``datasets``' builders, through a scratch cache deleted right after, so
    no stale cache is reused) or a ``save_to_disk`` directory (its train or eval split)."""
    path = Path(source).expanduser()
    allowed = "a readable .jsonl, .json, .csv, .tsv or .parquet file, or a datasets save_to_disk directory"
    if not path.is_dir():
        problem = regular_file_problem(path)
        if problem:
            raise ConfigError(field, source, allowed, problem)
    builder = None
    try:
        with _quiet_datasets() as datasets:
            if path.is_dir():
                data = datasets.load_from_disk(str(path), keep_in_memory=True)
                if isinstance(data, datasets.DatasetDict):
                    data = data[_pick_split(list(data), field, source)]
                return Table(source, field, tuple(data.column_names), data.to_list())
            builder = DATA_SUFFIXES[path.suffix.lower()]
            if builder == "json":
                _check_json_start(path, field, source)
            options = _csv_options(path, datasets) if builder == "csv" else {}
            cache_dir().mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="datasets-", dir=cache_dir()) as scratch:
                data = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True,
                                             cache_dir=scratch, **options)
                return Table(source, field, tuple(data.column_names), data.to_list())
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for malformed files
        hint = _text_file_problem(path, builder) if builder in ("json", "csv") else None
        raise ConfigError(field, source, allowed, clip(hint or f"{type(exc).__name__}: {exc}", 500)) from None


def _text_file_problem(path: Path, builder: str) -> str | None:
    """After ``datasets`` failed on a text file: its first line that is not UTF-8, or (JSON) where
    it is malformed, or None (then the library's own message is shown)."""
    try:
        where = first_non_utf8_line(path)
        if where:
            return f"not UTF-8 text at {where}"
        return _json_problem(path) if builder == "json" else None
    except (OSError, ValueError, MemoryError, RecursionError):
        return None


def _check_json_start(path: Path, field: str, source: str) -> None:
    """Refuse a .json/.jsonl file that is not records, looking at its first bytes only: a top-level
    list must hold objects (``datasets`` would read ``[1, 2]`` as a ``text`` column of numbers)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head and path.stat().st_size <= 1 << 16:
        raise ConfigError(field, source, "a data file with records", "the file is empty")
    if head[:1] == b"[":
        rest = head[1:].lstrip(b" \t\r\n")
        if rest and rest[:1] not in (b"{", b"]"):
            raise ConfigError(field, source, "a JSON list of records (objects) or JSON Lines (one object a line)",
                              f"its list holds {_json_kind(rest[:1])}, not objects")
    elif head[:1] != b"{":
        raise ConfigError(field, source, "a JSON list of records (objects) or JSON Lines (one object a line)",
                          f"the file starts with {head[:20]!r}, not an object or a list of objects")


def _json_kind(first: bytes) -> str:
    return {b"[": "lists", b'"': "strings", b"t": "booleans", b"f": "booleans", b"n": "nulls"}.get(first, "numbers")


def _json_problem(path: Path) -> str | None:
    """Where a JSON / JSON Lines file is malformed (``line N, column C: ...``, or the first record
    that is not an object), or None when it looks fine (the error was something else)."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"[":  # one JSON document (datasets reads it whole too)
        try:
            with open(path, encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        except (ValueError, RecursionError) as exc:
            return f"not valid JSON: {clip(str(exc) or type(exc).__name__, 200)}"
        if isinstance(data, list):
            bad = next((i for i, item in enumerate(data) if not isinstance(item, dict)), None)
            if bad is not None:
                return f"item {bad} of its list is {type(data[bad]).__name__} {short(data[bad], 60)}, not an object"
        return None
    try:
        with open(path, encoding="utf-8-sig") as fh:  # JSON Lines: data_files' reader says where
            for _ in json_lines(fh, path, "file"):
                pass
    except ConfigError as exc:
        return exc.hint
    return None


def _csv_options(path: Path, datasets: Any) -> dict[str, Any]:
    """Every column read as text, as written ("007" stays "007", "NA" stays "NA")."""
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    allow_long_csv_fields()
    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh, delimiter=sep), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"sep": sep, "features": features, "keep_default_na": False}


def _pick_split(names: list[str], field: str, source: str) -> str:
    wanted = ("train",) if field.endswith("train_file") else EVAL_SPLITS
    for name in wanted:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise ConfigError(field, source, f"a DatasetDict with a split named {' or '.join(wanted)}",
                      f"its splits: {', '.join(names)}")


def detect_format(table: Table, columns: Columns, given: str | None) -> str:
    """``given`` (its columns checked), else the first format whose columns ``table`` has."""
    present = ", ".join(table.columns)
    if given is not None:
        for key, column in columns.needed(given).items():
            if column not in table.columns:
                raise ConfigError(f"task.{key}", column, f"a column of {table.source!r} (format {given})",
                                  f"its columns: {clip(present, 300)}")
        return given
    for fmt in FORMATS:
        if all(column in table.columns for column in columns.needed(fmt).values()):
            return fmt
    layouts = "; ".join(f"{fmt}: {', '.join(columns.needed(fmt).values())}" for fmt in FORMATS)
    raise ConfigError("task.format", None, f"data whose columns fit one format ({layouts})",
                      f"{table.source!r} has the columns {clip(present, 300)}; name them with messages_column, "
                      "prompt_column/completion_column or text_column")


# -- rows -> conversations ------------------------------------------------------------------

def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _bad_row(table: Table, key: str, column: str, number: int, problem: str, allowed: str) -> ConfigError:
    return ConfigError(f"task.{key}", column, allowed, f"row {number} of {table.source!r}: {problem}")


def row_messages(table: Table, row: dict[str, Any], number: int, fmt: str, columns: Columns) -> list[dict[str, str]]:
    """The conversation of one row (prompt-completion: a user turn and an assistant turn)."""
    if fmt == "prompt-completion":
        prompt, completion = _as_text(row.get(columns.prompt)), _as_text(row.get(columns.completion))
        if prompt is None:
            raise _bad_row(table, "prompt_column", columns.prompt, number, f"prompt {short(row.get(columns.prompt))}",
                           "a string prompt")
        if completion is None or not completion.strip():
            raise _bad_row(table, "completion_column", columns.completion, number,
                           f"completion {short(row.get(columns.completion))}", "a non-empty string completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    value = row.get(columns.messages)
    if not isinstance(value, list) or not value:
        raise _bad_row(table, "messages_column", columns.messages, number, f"{short(value)}",
                       "a non-empty list of {role, content} messages")
    messages = []
    for index, message in enumerate(value):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise _bad_row(table, "messages_column", columns.messages, number, f"{where} is {short(message)}",
                           "messages that are {role, content} mappings")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _bad_row(table, "messages_column", columns.messages, number, f"{where} has role {short(role)}",
                           "roles " + ", ".join(ROLES))
        if not isinstance(content, str):
            raise _bad_row(table, "messages_column", columns.messages, number,
                           f"{where} has content {short(content)}", "string contents")
        if role == "assistant" and not content.strip():
            raise _bad_row(table, "messages_column", columns.messages, number,
                           f"{where} is an empty assistant message", "non-empty assistant messages")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad_row(table, "messages_column", columns.messages, number, "no assistant message",
                       "conversations with at least one assistant message")
    return messages


def row_text(table: Table, row: dict[str, Any], number: int, columns: Columns) -> str:
    text = _as_text(row.get(columns.text))
    if text is None or not text.strip():
        raise _bad_row(table, "text_column", columns.text, number, f"text {short(row.get(columns.text))}",
                       "non-empty string texts")
    return text


# -- rendering and label masks --------------------------------------------------------------

class Renderer:
    """Renders conversations with a chat template (or plain concatenation) and builds labels;
    ``marks_generation``: the template has ``{% generation %}`` blocks."""

    def __init__(self, tokenizer: Any, template: str | None, train_on: str):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.marks_generation = template is not None and GENERATION_BLOCK.search(template) is not None
        self.bos = _leading_bos(tokenizer)
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def render(self, messages: Sequence[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]

    def assistant_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]], int]:
        """The rendered conversation, the character spans of its assistant turns, and how many
        turns fell back to their content string (see the module docstring)."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        fallbacks = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self.render(messages[:i], generation_prompt=True), self.render(messages[:i + 1])
            cursor = spans[-1][1] if spans else 0
            if full.startswith(before) and full.startswith(through) and cursor <= len(before) < len(through):
                spans.append((len(before), len(through)))
                continue
            span, content_only = self._diverging_span(full, before, through, message["content"], cursor)
            spans.append(span)
            fallbacks += content_only
        return full, spans, fallbacks

    def _diverging_span(self, full: str, before: str, through: str, content: str,
                        cursor: int) -> tuple[tuple[int, int], bool]:
        """The span of an assistant turn that ``full`` renders differently from ``through`` (the
        conversation ending with it), and whether it is its content string alone."""
        content_start = full.find(content, max(cursor, len(before) if full.startswith(before) else cursor))
        if content_start < 0:
            raise ConfigError("task.chat_template", "(the chat template)",
                              "a template that writes each assistant message's content verbatim",
                              f"assistant content {content[:60]!r} is not in the rendering")
        content_end = content_start + len(content)
        start = len(before) if full.startswith(before) and cursor <= len(before) <= content_start else content_start
        full_ids, full_offsets = self.tokens(full)
        shared = 0
        for a, b in zip(full_ids, self.tokens(through)[0]):
            if a != b:
                break
            shared += 1
        end = full_offsets[shared - 1][1] if shared else 0
        return ((start, end), False) if end >= content_end else ((content_start, content_end), True)

    def encode_messages(self, messages: list[dict[str, str]]) -> tuple[Example, int]:
        """The example of one conversation, and its count of content-only turns."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if self.template is None:  # prompt-completion without a chat template
            prompt, completion = messages[0]["content"], messages[1]["content"]
            text = prompt + completion
            ids, offsets = self.tokens(text)
            spans = [(0 if self.train_on == "all" else len(prompt), len(text))]
            labels = _labels(ids, offsets, spans)
            prompt_ids = self.bos + self.tokens(prompt)[0]
            ids, labels = self.bos + ids + self.eos, [IGNORE] * len(self.bos) + labels + self.eos
            fallbacks = 0
        else:
            if self.train_on == "all":
                text = self.assistant_spans(messages)[0]  # (which checks the template writes every answer)
                ids, offsets = self.tokens(text)
                labels, fallbacks = _labels(ids, offsets, [(0, len(text))]), 0
            elif self.marks_generation:
                (ids, labels), fallbacks = self.generation_labels(messages), 0
            else:
                ids, labels, fallbacks = self.span_labels(messages)
            prompt_ids = self.tokens(self.render(messages[:last], generation_prompt=True))[0]
        labels[0] = IGNORE
        return Example(ids, labels, prompt_ids, messages[last]["content"]), fallbacks

    def generation_labels(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """ids and labels from the tokenizer's assistant mask (tokens overlapping a
        ``{% generation %}`` block); the template must have one."""
        out = self.tokenizer.apply_chat_template(list(messages), chat_template=self.template, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [token if marked else IGNORE for token, marked in zip(ids, out["assistant_masks"])]

    def span_labels(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int], int]:
        """ids and labels from :meth:`assistant_spans` (a token whose first character lies in an
        assistant span is supervised), and the count of content-only turns."""
        text, spans, fallbacks = self.assistant_spans(messages)
        ids, offsets = self.tokens(text)
        return ids, _labels(ids, offsets, spans), fallbacks

    def end_of_turn_id(self) -> int | None:
        """The special token the template closes an assistant turn with (a stop token for
        generation), or None: found by rendering a one-exchange probe conversation."""
        if self.template is None:
            return None
        from jinja2 import TemplateError

        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
        try:
            text, spans, _ = self.assistant_spans(probe)
        except (TemplateError, ConfigError):
            return None
        end = text.find("Yes", spans[0][0]) + len("Yes")
        ids, offsets = self.tokens(text)
        after = next((token for token, (start, _) in zip(ids, offsets) if start >= end), None)
        return after if after in self.tokenizer.all_special_ids else None

    def encode_text(self, text: str) -> Example:
        ids = self.bos + self.tokens(text)[0] + self.eos
        return Example(ids, [IGNORE] + ids[1:])


def _leading_bos(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts BOS in front of a text by itself, else ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` where a token's first character lies in one of ``spans`` (sorted), else IGNORE."""
    labels = [IGNORE] * len(ids)
    k = 0
    for i, (start, _end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= start:
            labels[i] = ids[i]
    return labels


def encode_table(table: Table, fmt: str, columns: Columns, renderer: Renderer, max_length: int) -> Split:
    """Every row of ``table`` as an :class:`Example`; rows longer than ``max_length`` are counted
    in ``too_long`` and left out."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    split = Split()
    for number, row in enumerate(table.rows, 1):
        if fmt == "text":
            example, fallbacks = renderer.encode_text(row_text(table, row, number, columns)), 0
        else:
            messages = row_messages(table, row, number, fmt, columns)
            try:
                example, fallbacks = renderer.encode_messages(messages)
            except TemplateError as exc:  # e.g. raise_exception('System role not supported')
                raise ConfigError("task.chat_template", "(the chat template)", "a template that renders this data",
                                  f"row {number} of {table.source!r}: {clip(str(exc), 300)}") from None
        if len(example.input_ids) > max_length:
            split.too_long += 1
            continue
        if example.supervised == 0:
            raise ConfigError("task.train_on", renderer.train_on, "settings that supervise at least one token",
                              f"row {number} of {table.source!r} has no supervised token")
        split.examples.append(example)
        split.content_only_turns += fallbacks
    return split


# -- packing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """Whole examples concatenated; ``position_ids`` restart at 0 at each example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(examples: Sequence[Example], max_length: int) -> list[Block]:
    """Examples in order, concatenated into blocks of at most ``max_length`` tokens; an example
    that does not fit in the current block starts the next one (no example is split)."""
    blocks: list[Block] = []
    for example in examples:
        if not blocks or len(blocks[-1].input_ids) + len(example.input_ids) > max_length:
            blocks.append(Block([], [], []))
        block = blocks[-1]
        block.input_ids.extend(example.input_ids)
        block.labels.extend(example.labels)
        block.position_ids.extend(range(len(example.input_ids)))
    return blocks
