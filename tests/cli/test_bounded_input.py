"""Hostile or broken study files end in exit 2 naming the file or key, within seconds and bounded
memory: a 'billion laughs' YAML, a huge `choices` list, an oversize file, a FIFO, /dev/zero, a
directory. Each case runs `lora-tune` in a subprocess with a timeout and an address-space limit,
so that a regression fails the test instead of hanging it or eating the machine's memory."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 3 << 29  # 1.5 GiB of address space: lora-tune validate needs about 250 MB
HEAD = "task:\n  type: python\n  factory: tests.study.toy_task:make_task\n"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _lora_tune(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("LORA_TUNE_STORAGE", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lora_tune.cli.main", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory)
    return result, time.monotonic() - start


def _refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < 2000, result.stderr[:2000]  # a short message, never the value
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def laughs(levels: int = 9) -> str:
    """A flow list whose aliases expand to 10**levels strings in about 600 bytes."""
    parts = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("where", ["study.name", "task.args"])
def test_billion_laughs_is_refused_in_seconds(tmp_path, where):
    if where == "study.name":
        text = f"study:\n  name: {laughs()}\n" + HEAD
    else:  # a valid file otherwise: the value reaches the stored spec (to_stored) if it is let through
        text = "study:\n  name: laughs\n" + HEAD + f"  args:\n    fail_in: {laughs()}\n"
    path = tmp_path / "laughs.yaml"
    path.write_text(text)
    assert len(text) < 2000
    result, elapsed = _lora_tune("validate", str(path))
    _refused(result, str(path), "250,000 values", "billion laughs")
    assert elapsed < 30


def test_a_huge_choices_list_is_refused_fast_with_a_short_message(tmp_path):
    choices = ", ".join(str(i) for i in range(1, 20_001)) + ", 1"  # and one twice
    path = tmp_path / "choices.yaml"
    path.write_text("study:\n  name: choices\n" + HEAD + f"search_space:\n  rank:\n    choices: [{choices}]\n")
    result, elapsed = _lora_tune("validate", str(path))
    _refused(result, "search_space.rank.choices: lists 20,001 values; at most 1,000")
    assert elapsed < 30


def test_an_oversize_study_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("study:\n  name: big\n" + HEAD + ("# padding\n" * 210_000))  # 2.1 MB
    result, _ = _lora_tune("study", "create", str(path))
    _refused(result, str(path), "at most 1,048,576 bytes (1 MiB)")


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "study.yaml"
    os.mkfifo(path)
    return str(path)


SPECIAL = {
    "fifo": (_fifo, "a FIFO"),
    "dev-zero": (lambda tmp_path: "/dev/zero", "a character device"),
}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_a_fifo_or_a_device_as_the_study_file_is_exit_2(tmp_path, kind):
    make, what = SPECIAL[kind]
    path = make(tmp_path)
    result, elapsed = _lora_tune("study", "create", path, timeout=30)
    _refused(result, path, f"is not a regular file ({what})")
    assert elapsed < 30


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_validate_refuses_a_fifo_or_a_device(tmp_path, kind):
    make, what = SPECIAL[kind]
    path = make(tmp_path)
    result, _ = _lora_tune("validate", path, timeout=10)
    _refused(result, path, f"is not a regular file ({what})")


def test_a_directory_as_the_study_file_is_exit_2(tmp_path):
    folder = tmp_path / "study.yaml"
    folder.mkdir()
    for command in (["validate"], ["study", "create"]):
        result, _ = _lora_tune(*command, str(folder), timeout=30)
        _refused(result, str(folder), "is a directory")
