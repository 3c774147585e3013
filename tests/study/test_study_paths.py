"""Relative paths in a study file are read against the study file's folder, from any directory;
the stored study keeps them as written with that folder (issue 19)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_tune.cli.main import cli
from lora_tune.study.schema.spec import load_spec_file, spec_from_stored

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "studies" / "data" / "sft"
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
FACTORY = '''
import torch

def make(note=None):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    return {"model": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
            "train": (x, (x[:, 0] > 0).long()), "eval": (x[:8], (x[:8, 0] > 0).long())}
'''


def _project(tmp_path: Path) -> Path:
    """A study folder ``proj/`` holding its data, tokenizer and chat template."""
    proj = tmp_path / "proj"
    shutil.copytree(SFT / "tokenizer", proj / "data" / "tokenizer")
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(SFT / name, proj / "data" / name)
    (tmp_path / "elsewhere").mkdir()
    return proj


def _sft_study(folder: Path, prefix: str = "", storage: str | None = None, **task) -> Path:
    data = {
        "study": {"name": "paths", "n_trials": 1, "baseline": False, "storage": storage,
                  "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"}},
        "task": {"type": "sft", "model": {"config": LLAMA}, "tokenizer": f"{prefix}data/tokenizer",
                 "chat_template": f"{prefix}data/tokenizer/chat_template.jinja",
                 "train_file": f"{prefix}data/train.jsonl", "eval_file": f"{prefix}data/eval.jsonl",
                 "format": "messages", "max_length": 64, "max_train_examples": 8, "max_eval_examples": 4, **task},
        "search_space": {"rank": 4, "targets": "attention-qv"},
        "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "threads": 1},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_reads_a_study_files_relative_paths_against_its_folder_from_another_directory(tmp_path, monkeypatch):
    proj = _project(tmp_path)
    path = _sft_study(proj)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"relative paths read against: {proj}" in result.output and "warning" not in result.output


def test_a_path_found_only_in_the_current_directory_is_read_from_there_with_a_warning(tmp_path, monkeypatch):
    """The behaviour before: relative to the cwd. Kept for now, with what to write instead."""
    proj = _project(tmp_path)
    path = _sft_study(proj, prefix="proj/")  # written relative to tmp_path, where lora-tune runs
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "warning: task.train_file: 'proj/data/train.jsonl' is not in the study file's folder" in out
    assert "write 'data/train.jsonl'" in out and "warning: task.tokenizer:" in out
    spec = load_spec_file(path)
    assert spec.resolved_task()["train_file"] == "proj/data/train.jsonl"  # read from the cwd


def test_a_missing_relative_path_is_named_where_it_was_looked_for(tmp_path, monkeypatch):
    proj = _project(tmp_path)
    path = _sft_study(proj, train_file="data/missing.jsonl")
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"task.train_file: file not found: '{proj / 'data' / 'missing.jsonl'}'" in " ".join(result.output.split())


def test_the_stored_study_keeps_paths_as_written_and_a_worker_elsewhere_reads_them(tmp_path, monkeypatch):
    from lora_tune.study.run.runner import load_study
    from lora_tune.tasks import build_task

    proj = _project(tmp_path)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    path = _sft_study(proj, storage=storage)
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["study", "create", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "worker")
    study, spec = load_study("paths", storage)
    assert spec.task["train_file"] == "data/train.jsonl" and spec.study_dir == str(proj)
    assert spec.resolved_task()["train_file"] == str(proj / "data" / "train.jsonl")
    assert build_task(spec.resolved_task()).name == "sft"
    result = CliRunner().invoke(cli, ["study", "optimize", "paths", "--storage", storage], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [t.state.name for t in study.trials] == ["COMPLETE"], [t.user_attrs.get("fail_reason") for t in study.trials]


def test_code_is_imported_from_the_study_files_folder_only_when_this_process_read_the_file(tmp_path, monkeypatch):
    """A stored study's folder is not trusted for code: whoever can write the storage could point
    an allowed ``make.py:*`` at another file. A file given on the command line (or
    ``--study-file``) is: its folder's ``make.py`` is the one imported."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "make.py").write_text(FACTORY)
    data = {"study": {"name": "code", "n_trials": 1, "baseline": False}, "search_space": {"rank": 2},
            "task": {"type": "python", "factory": "make.py:make", "args": {"note": "make.py:make"}},
            "train": {"device": "cpu", "epochs": 1}}
    (proj / "study.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(cli, ["validate", str(proj / "study.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    spec = load_spec_file(proj / "study.yaml")
    resolved = spec.resolved_task()
    assert resolved["factory"] == f"{proj / 'make.py'}:make" and resolved["args"] == {"note": "make.py:make"}
    stored = spec_from_stored(spec.to_stored())
    assert stored.task == data["task"] and stored.study_dir == str(proj)
    assert stored.resolved_task()["factory"] == "make.py:make"  # not trusted: read from the cwd as before
    assert stored.trust_code_dir(proj).resolved_task()["factory"] == f"{proj / 'make.py'}:make"
