"""sft data: every file kind datasets reads, format detection, column names, splits and subsets."""
from __future__ import annotations

import json

import pytest

from lora_tune.errors import ConfigError
from lora_tune.tasks import build_task
from lora_tune.tasks.chat_data import Columns, Table, detect_format
from tests.tasks.conftest import write_table
from tests.tasks.test_sft import CONVERSATIONS, LLAMA, PC_ROWS


pytestmark = pytest.mark.usefixtures("sft_cache")

def spec(tokenizer_dir, train, held_out=None, **extra):
    out = {"type": "sft", "model": {"config": dict(LLAMA)}, "tokenizer": str(tokenizer_dir), "train_file": str(train),
           **extra}
    if held_out is not None:
        out["eval_file"] = str(held_out)
    return out


def completions(task):
    return [e.reference for e in task.train.examples]


def test_csv_keeps_numbers_as_written(tmp_path, chat_tokenizer_dir):
    rows = [{"prompt": "Pad 7 to three digits", "completion": "007"},
            {"prompt": "What is 2 plus 2?", "completion": "4"}]
    path = write_table(tmp_path / "train.csv", rows)
    task = build_task(spec(chat_tokenizer_dir, path, path))
    assert task.format == "prompt-completion" and completions(task) == ["007", "4"]


def test_tsv_json_array_and_parquet(tmp_path, chat_tokenizer_dir):
    import datasets

    tsv = write_table(tmp_path / "train.tsv", PC_ROWS)
    array = tmp_path / "train.json"
    array.write_text(json.dumps(PC_ROWS))
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(CONVERSATIONS).to_parquet(str(parquet))
    for path in (tsv, array):
        assert completions(build_task(spec(chat_tokenizer_dir, path, path))) == [r["completion"] for r in PC_ROWS]
    task = build_task(spec(chat_tokenizer_dir, parquet, parquet))
    assert task.format == "messages" and len(task.train.examples) == len(CONVERSATIONS)


def test_save_to_disk_dataset_dict_gives_train_and_validation_splits(tmp_path, chat_tokenizer_dir):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PC_ROWS[:4]),
                          "validation": datasets.Dataset.from_list(PC_ROWS[4:])}).save_to_disk(str(saved))
    task = build_task(spec(chat_tokenizer_dir, saved, saved))
    assert len(task.train.examples) == 4
    assert [e.reference for e in task.eval.examples] == [r["completion"] for r in PC_ROWS[4:]]
    several = tmp_path / "several"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(PC_ROWS), "b": datasets.Dataset.from_list(PC_ROWS)}
                         ).save_to_disk(str(several))
    with pytest.raises(ConfigError) as info:
        build_task(spec(chat_tokenizer_dir, several, saved))
    assert info.value.field == "task.train_file" and "a, b" in str(info.value)


def test_malformed_file_is_an_error_naming_the_key(tmp_path, chat_tokenizer_dir):
    good = write_table(tmp_path / "good.jsonl", PC_ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(ConfigError) as info:
        build_task(spec(chat_tokenizer_dir, good, bad))
    assert info.value.field == "task.eval_file" and "bad.jsonl" in str(info.value)


@pytest.mark.parametrize("columns, expected", [
    (("messages", "id"), "messages"), (("prompt", "completion", "text"), "prompt-completion"),
    (("text", "source"), "text"), (("messages", "prompt", "completion"), "messages")])
def test_format_detection_order(columns, expected):
    assert detect_format(Table("f.jsonl", "task.train_file", columns, []), Columns(), None) == expected


def test_renamed_columns(tmp_path, chat_tokenizer_dir):
    conversations = write_table(tmp_path / "c.jsonl", [{"conversation": r["messages"]} for r in CONVERSATIONS])
    task = build_task(spec(chat_tokenizer_dir, conversations, conversations, messages_column="conversation"))
    assert task.format == "messages" and len(task.train.examples) == len(CONVERSATIONS)
    qa = write_table(tmp_path / "qa.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in PC_ROWS])
    task = build_task(spec(chat_tokenizer_dir, qa, qa, prompt_column="question", completion_column="answer"))
    assert task.format == "prompt-completion" and completions(task) == [r["completion"] for r in PC_ROWS]


def test_eval_file_must_have_the_training_format_columns(tmp_path, chat_tokenizer_dir):
    train = write_table(tmp_path / "train.jsonl", CONVERSATIONS)
    held_out = write_table(tmp_path / "eval.jsonl", PC_ROWS)
    with pytest.raises(ConfigError) as info:
        build_task(spec(chat_tokenizer_dir, train, held_out))
    assert info.value.field == "task.messages_column" and "eval.jsonl" in str(info.value)


def test_text_detected_with_train_on_completion_is_an_error(tmp_path, chat_tokenizer_dir):
    texts = write_table(tmp_path / "t.jsonl", [{"text": "green blue red"}, {"text": "Paris"}])
    with pytest.raises(ConfigError) as info:
        build_task(spec(chat_tokenizer_dir, texts, texts, train_on="completion"))
    assert info.value.field == "task.train_on"


def test_eval_fraction_split_and_seeded_subsets(tmp_path, chat_tokenizer_dir):
    rows = [{"prompt": f"What is {i} plus 1?", "completion": str(i + 1)} for i in range(40)]
    path = write_table(tmp_path / "train.jsonl", rows)
    task = build_task(spec(chat_tokenizer_dir, path, eval_fraction=0.25, seed=2))
    train, held_out = completions(task), [e.reference for e in task.eval.examples]
    assert len(train) == 30 and len(held_out) == 10 and not set(train) & set(held_out)
    assert build_task(spec(chat_tokenizer_dir, path, eval_fraction=0.25, seed=2)).eval.examples == task.eval.examples
    reseeded = build_task(spec(chat_tokenizer_dir, path, eval_fraction=0.25, seed=3))
    assert [e.reference for e in reseeded.eval.examples] != held_out
    capped = build_task(spec(chat_tokenizer_dir, path, path, max_train_examples=5, max_eval_examples=3))
    assert len(capped.train.examples) == 5 and len(capped.eval.examples) == 3
    ordered = [int(c) for c in completions(capped)]
    assert ordered == sorted(ordered)  # a subset in file order
    one = write_table(tmp_path / "one.jsonl", rows[:1])
    with pytest.raises(ConfigError) as info:
        build_task(spec(chat_tokenizer_dir, one))
    assert info.value.field == "task.train_file"


def test_vocabulary_larger_than_the_model_is_an_error(tmp_path, chat_tokenizer_dir):
    path = write_table(tmp_path / "train.jsonl", PC_ROWS)
    bad = spec(chat_tokenizer_dir, path, path)
    bad["model"]["config"]["vocab_size"] = 50
    with pytest.raises(ConfigError) as info:
        build_task(bad)
    assert info.value.field == "task.tokenizer" and "50 embeddings" in str(info.value)


def test_chat_tokenizer_toolkit(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    from lora_tune.models.tiny_lm import CHAT_TEMPLATE, SPECIAL_TOKENS

    tokenizer = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    assert tokenizer.is_fast and tokenizer.chat_template == CHAT_TEMPLATE
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == SPECIAL_TOKENS[:3]
    for marker in SPECIAL_TOKENS:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    text = "What is 123 plus 4? Ünïcode ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: lossless
    assert [tokenizer.decode([i]) for i in tokenizer("123", add_special_tokens=False)["input_ids"]] == ["1", "2", "3"]


def test_reading_leaves_no_cache_behind(tmp_path, chat_tokenizer_dir, sft_cache):
    path = write_table(tmp_path / "train.jsonl", PC_ROWS)
    build_task(spec(chat_tokenizer_dir, path, path))
    assert list(sft_cache.iterdir()) == []
    rows = PC_ROWS[:2] + [{"prompt": "What is 1 plus 1?", "completion": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # same name and size class: re-read, not cached
    assert completions(build_task(spec(chat_tokenizer_dir, path, path)))[-1] == "2"
