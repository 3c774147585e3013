"""Bounded input, library side: error messages show a short, cheaply computed prefix of any value;
study files are capped in size, alias expansion and nesting; search-space lists are capped."""
from __future__ import annotations

import time

import pytest

from lora_tune.errors import ConfigError, StudySpecError, short
from lora_tune.study.schema.space import SearchSpace
from lora_tune.study.schema.space_keys import MAX_CHOICES, MAX_LIST_ITEMS
from lora_tune.study.schema.spec import load_spec_file
from lora_tune.study.schema.yaml_file import MAX_SPEC_BYTES, load_yaml, read_spec_text


def shared_laughs(levels: int = 9) -> list:
    """10**levels strings in a structure of `levels` shared lists (what YAML aliases build)."""
    value: list = ["lol"] * 10
    for _ in range(levels - 1):
        value = [value] * 10
    return value


VALUES = {
    "laughs": shared_laughs, "long-list": lambda: list(range(10**6)),
    "big-dict": lambda: {i: "x" * 10 for i in range(10**5)}, "long-str": lambda: "x" * 10**7,
    "long-bytes": lambda: b"y" * 10**7, "huge-int": lambda: 10**20000, "big-set": lambda: set(range(10**5)),
    "big-frozenset": lambda: frozenset(range(10**5)), "long-tuple": lambda: tuple(range(10**5)),
}


@pytest.mark.parametrize("kind", list(VALUES))
def test_short_is_bounded_in_length_and_time(kind):
    value = VALUES[kind]()
    start = time.monotonic()
    text = short(value)
    assert len(text) <= 200 and time.monotonic() - start < 0.5


def test_short_shows_small_values_as_repr_and_big_ones_with_their_size():
    assert [short(v) for v in ("tpu", 8, None, [2, 4], {"a": 1}, (1,))] == ["'tpu'", "8", "None", "[2, 4]",
                                                                            "{'a': 1}", "(1,)"]
    assert short(list(range(100))).endswith("... (100 items)]")
    assert "(5000 characters)" in short("x" * 5000)
    recursive: list = []
    recursive.append(recursive)
    assert short(recursive) == "[[[[...]]]]"


def test_config_error_shows_a_short_prefix_of_the_value():
    error = ConfigError("task.args", shared_laughs(), "a mapping")
    assert str(error).startswith("task.args: got [[[[") and len(str(error)) < 300


def test_study_spec_error_lists_at_most_50_errors_each_clipped():
    error = StudySpecError([(f"search_space.k{i}", "x" * 100_000) for i in range(1000)], source="s.yaml")
    text = str(error)
    assert text.startswith("s.yaml: 1000 error(s)") and "... and 950 more" in text
    assert len(text) < 60_000 and len(error.errors) == 1000


def _laughs(levels: int = 9) -> str:
    parts = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("text, fragments", [
    (f"study:\n  name: {_laughs()}\n", ["line 2, column", "more than 250,000 values", "billion laughs"]),
    ("a: &s '" + "x" * 500_000 + "'\nb: [*s, *s, *s, *s, *s]\n", ["line 2", "more than 2,097,152 characters"]),
    ("a: &a [1, *a]\n", ["line 1", "refers to the value that contains it"]),
    ("a: &a {b: *a}\n", ["line 1", "refers to the value that contains it"]),
    ("a: " + "[" * 150 + "]" * 150 + "\n", ["nested more than 100 levels"]),
    ("d: &d " + "[" * 60 + "]" * 60 + "\ne: " + "[" * 60 + "*d" + "]" * 60 + "\n", ["nested more than 100 levels"]),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", ["not valid YAML"]),
    ("a: 2021-13-45\n", ["line 1, column 4", "cannot read this value: month must be in 1..12"]),
    ("a: " + "1" * 5000 + "\n", ["line 1, column 4", "cannot read this value"]),
    ("? [1, 2]\n: 3\n", ["line 1", "a key must be a plain value"]),
    ("a: 1\na: 2\n", ["line 2", "duplicate key 'a'"]),
])
def test_yaml_that_would_blow_up_is_refused_with_its_line(text, fragments):
    start = time.monotonic()
    with pytest.raises(StudySpecError) as info:
        load_yaml(text, source="s.yaml")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert message.startswith("s.yaml: 1 error(s)") and len(message) < 1000
    for fragment in fragments:
        assert fragment in message, message


def test_yaml_anchors_and_merge_keys_of_real_files_still_load():
    text = ("defaults: &d {epochs: 2, batch_size: 16}\ntrain:\n  <<: *d\n  epochs: 3\n"
            "targets: &t [q_proj, v_proj]\nagain: *t\n")
    assert load_yaml(text) == {"defaults": {"epochs": 2, "batch_size": 16}, "train": {"epochs": 3, "batch_size": 16},
                               "targets": ["q_proj", "v_proj"], "again": ["q_proj", "v_proj"]}


def test_a_study_file_over_1_mib_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("study: {name: big}\n" + "#" * MAX_SPEC_BYTES)
    with pytest.raises(StudySpecError, match=r"big.yaml' is 1,048,595 bytes; a study file may be at most 1,048,576"):
        load_spec_file(path)
    with pytest.raises(StudySpecError, match="at most 1,048,576"):
        load_yaml("#" * (MAX_SPEC_BYTES + 1))


def test_a_directory_or_a_device_is_not_read(tmp_path):
    with pytest.raises(StudySpecError, match="is a directory, not a study file"):
        read_spec_text(tmp_path)
    with pytest.raises(StudySpecError, match=r"'/dev/null' is not a regular file \(a character device\)"):
        read_spec_text("/dev/null")  # empty, but /dev/zero would be endless: devices are refused alike


def test_a_study_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"study:\n  name: caf\xe9\n")
    with pytest.raises(StudySpecError, match="not UTF-8 text \\(line 2"):
        read_spec_text(path)


LONG_LISTS = {
    "choices": (lambda: {"rank": {"choices": list(range(1, 2_000_001))}},
                "search_space.rank.choices: lists 2,000,000 values; at most 1,000"),
    "ratio": (lambda: {"alpha": {"ratio": [1.0] * 5000}}, "search_space.alpha.ratio: lists 5,000 values"),
    "nested": (lambda: {"rank": {"nested": list(range(1, 5000))}}, "search_space.rank.nested: lists 4,999 values"),
    "targets": (lambda: {"targets": ["q_proj"] * (MAX_LIST_ITEMS + 1)}, "search_space.targets: lists 10,001 items"),
    "a-choice": (lambda: {"targets": {"choices": [["q_proj"] * (MAX_LIST_ITEMS + 1)]}},
                 "search_space.targets.choices[0]: lists 10,001"),
}


@pytest.mark.parametrize("kind", list(LONG_LISTS))
def test_search_space_lists_are_capped_before_their_items_are_checked(kind):
    make, where = LONG_LISTS[kind]
    entry = make()
    start = time.monotonic()
    with pytest.raises(StudySpecError) as info:
        SearchSpace.from_dict(entry)
    assert time.monotonic() - start < 1
    assert where in str(info.value) and len(str(info.value)) < 500


def test_lists_up_to_the_caps_are_fine_and_a_repeated_choice_is_named():
    space = SearchSpace.from_dict({"rank": {"choices": list(range(1, MAX_CHOICES + 1))}})
    assert len(space["rank"].choices) == MAX_CHOICES
    with pytest.raises(StudySpecError) as info:
        SearchSpace.from_dict({"rank": {"choices": list(range(1, 900)) + [7]}})
    message = str(info.value)
    assert "lists the same choice twice: 7 (in [1, 2, 3" in message and len(message) < 500
