"""Every study file shipped in studies/ validates, and says how to run it on its first line."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_tune.study.run.runner import prepare_spec
from lora_tune.study.schema.spec import check_spec, load_spec_file, study_folder

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


def test_there_are_study_files():
    names = [p.name for p in STUDIES]
    assert "quickstart.yaml" in names and len(names) >= 2


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_study_file_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # task paths in a study file are relative to its folder, not the cwd
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# Run: lora-tune run studies/{path.name}")
    spec, problems = check_spec(yaml.safe_load(path.read_text()), study_folder(path))
    # Data outside the repository (../../shared, for the bigger example studies) and a real model
    # the user puts under models/ (sft-llama) may be absent on this machine; any other problem
    # is a defect of the file (tests/tasks/test_sft_studies.py validates sft-llama with a model).
    outside = f"'{ROOT.parent / 'shared'}"
    absent = [(p, m) for p, m in problems if (m.startswith("file not found") and outside in m)
              or (p == "task.model" and m.startswith(f"model directory not found: '{ROOT / 'models'}"))]
    assert [x for x in problems if x not in absent] == []
    if not problems:
        assert spec is not None and spec.study.name


@pytest.mark.slow
def test_quickstart_checks_against_its_task():
    """Metric names, baseline inside the space, sampler and pruner options (builds the digits task)."""
    spec, task, baseline = prepare_spec(load_spec_file(ROOT / "studies" / "quickstart.yaml"))
    assert spec.metrics == ["accuracy"] and task.name == "digits"
    assert baseline["rank"] == 8 and baseline["targets"] == "attention-qv" and baseline["quant_bits"] == 0
