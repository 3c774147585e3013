"""Odd data files: CSV fields of any length read fine; a malformed JSON line, a JSON file that is
not records, a file that is not Parquet, text that is not UTF-8, an empty file, a FIFO are a
ConfigError (exit 2 on the CLI) naming the key, the file and the line; never a traceback or a hang."""
from __future__ import annotations

import json
import os
import threading

import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.errors import ConfigError
from lora_tune.tasks import validate_task_spec
from lora_tune.tasks import chat_data
from lora_tune.tasks import data_files as files
from tests.tasks.conftest import write_table
from tests.tasks.test_sft import LLAMA, PC_ROWS

LONG = "x" * 200_000  # over csv's default field limit of 131,072 characters


@pytest.fixture
def sft_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path / "cache"))


# -- text-classification tables (lora_tune.tasks.data_files) ---------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_csv_field_of_200000_characters_reads_fine(tmp_path, suffix):
    path = write_table(tmp_path / f"train{suffix}", [{"text": LONG, "label": "a"}, {"text": "short", "label": "b"}])
    rows = files.read_table(path, ["text", "label"], "task.train_file")
    assert [len(r["text"]) for r in rows] == [200_000, 5]
    header = tmp_path / f"wide{suffix}"
    header.write_text(f"text{suffix == '.tsv' and chr(9) or ','}{LONG}\n")
    assert files.read_columns(header) == ["text", LONG]


def _raises(call, *fragments):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < 1000
    return message


def test_table_errors_name_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n\n{"text": "b" "label": "y"}\n')
    _raises(lambda: files.read_table(bad, ["text"], "task.train_file"),
            "task.train_file", str(bad), "line 3, column 14: Expecting ',' delimiter")
    _raises(lambda: files.read_columns(tmp_path / "bad.jsonl") if bad.write_text("[1, 2]\n") else None,
            str(bad), "line 1 is list [1, 2], not an object")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\nok,a\ncaf\xe9,b\n")
    _raises(lambda: files.read_table(latin, ["text"], "task.eval_file"),
            "task.eval_file", str(latin), "not UTF-8 at line 3, byte 4")
    quotes = tmp_path / "quotes.csv"
    quotes.write_text('text,label\n"a"b"\n')
    assert files.read_table(quotes, ["text"], "task.train_file")  # csv's lenient quoting: no error


def _in_a_thread(call, seconds=10):
    """``call()``'s exception, failing (not hanging) if it blocks, as opening a FIFO would."""
    outcome: list = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, "blocked: the FIFO was opened"
    return outcome[0]


def test_a_fifo_as_a_data_file_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    problems = dict(validate_task_spec({"type": "text-classification", "model": "minilm", "train_file": str(fifo),
                                        "eval_file": str(fifo)}))
    assert "is not a regular file (a FIFO" in problems["task.train_file"]
    for call in (lambda: files.read_table(fifo, ["text"], "task.train_file"), lambda: files.read_columns(fifo),
                 lambda: files.read_text(fifo, "task.train_file"),
                 lambda: chat_data.read_table(str(fifo), "task.train_file")):
        error = _in_a_thread(call)
        assert isinstance(error, ConfigError) and "not a regular file" in str(error) and str(fifo) in str(error)
    assert "not a regular file" in chat_data.check_data_path(str(fifo))


# -- sft data files (lora_tune.tasks.chat_data, read through datasets) -------------------------

SFT_CASES = {
    "jsonl-syntax": ("train.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c" "completion": "d"}\n',
                     "line 2, column 16: Expecting ',' delimiter"),
    "jsonl-not-object": ("train.jsonl", b'{"prompt": "a", "completion": "b"}\n5\n', "line 2 is int 5, not an object"),
    "json-of-numbers": ("train.json", b"[1, 2, 3]", "its list holds numbers, not objects"),
    "json-string": ("train.json", b'"hello"', "the file starts with b'\"hello\"'"),
    "json-mixed": ("train.json", b'[{"prompt": "a", "completion": "b"}, 5]', "item 1 of its list is int 5"),
    "jsonl-latin1": ("train.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "d"}\n',
                     "not UTF-8 text at line 2, byte 16"),
    "csv-latin1": ("train.csv", b"prompt,completion\na,b\ncaf\xe9,d\n", "not UTF-8 text at line 3, byte 4"),
    "not-parquet": ("train.parquet", b"PAR1 this is not parquet", "Parquet magic bytes not found"),
    "empty": ("train.jsonl", b"", "the file is empty"),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_data_errors_name_the_file_and_the_line(tmp_path, sft_cache_dir, case):
    name, content, fragment = SFT_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    _raises(lambda: chat_data.read_table(str(path), "task.train_file"), "task.train_file", str(path), fragment)


def test_sft_csv_with_a_200000_character_header_and_field_reads_fine(tmp_path, sft_cache_dir):
    path = tmp_path / "train.csv"
    path.write_text(f"prompt,completion,{LONG}\nq,{LONG},z\n")
    table = chat_data.read_table(str(path), "task.train_file")
    assert table.columns == ("prompt", "completion", LONG) and len(table.rows[0]["completion"]) == 200_000


# -- the CLI: exit 2 naming the file ----------------------------------------------------------

def _validate(study: dict, path):
    path.write_text(yaml.safe_dump(study))
    return CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)


def test_validate_text_classification_with_a_200000_character_csv_header_is_exit_2(tmp_path, tiny_bert_dir):
    train = tmp_path / "train.csv"
    train.write_text(f"text,{LONG}\nhello,a\n")
    study = {"study": {"name": "wide"}, "task": {"type": "text-classification", "model": str(tiny_bert_dir),
                                               "train_file": str(train), "eval_file": str(train)}}
    result = _validate(study, tmp_path / "study.yaml")
    assert result.exit_code == 2, result.output
    assert "task.label_column: column 'label' is not in" in result.output and str(train) in result.output
    assert len(result.output) < 5000


def test_validate_sft_with_a_malformed_jsonl_line_is_exit_2(tmp_path, chat_tokenizer_dir, sft_cache_dir):
    train = tmp_path / "train.jsonl"
    lines = [json.dumps(row) for row in PC_ROWS]
    lines[3] = lines[3][:-1]  # the closing brace of line 4 missing
    train.write_text("\n".join(lines) + "\n")
    study = {"study": {"name": "broken"},
             "task": {"type": "sft", "model": {"config": dict(LLAMA)}, "tokenizer": str(chat_tokenizer_dir),
                      "train_file": str(train), "eval_file": str(train)},
             "train": {"device": "cpu"}}
    result = _validate(study, tmp_path / "study.yaml")
    assert result.exit_code == 2, result.output
    assert "task.train_file" in result.output and str(train) in result.output and "line 4, column" in result.output
