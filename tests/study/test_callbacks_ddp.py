"""The callbacks under torchrun/DDP: two CPU processes on the gloo backend, each running a real
transformers Trainer (or Lightning's DDP strategy); rank 0 holds the Optuna trial (SQLite
storage), rank 1 a spy. The helper script is tests/study/ddp_callback_script.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.study.callback_models import TokenSequences

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_callback_script.py")
NEEDS = {"hf": ("transformers", "accelerate"), "lightning": ("lightning.pytorch",)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lightning_ranks_tokens(steps: int, batch_size: int) -> int:
    """Non-padding tokens of the first ``steps`` batches of both ranks' DistributedSampler shards
    of the 32 training sequences (shuffled with seed 0 in epoch 0, rank r taking every 2nd index)."""
    import torch

    lengths = TokenSequences(32, seed=0).lengths
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist()
    return sum(int(lengths[i]) for rank in (0, 1) for i in order[rank::2][: steps * batch_size])


def run_two_ranks(framework: str, tmp_path: Path) -> tuple[optuna.trial.FrozenTrial, list[dict]]:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="ddp", storage=storage)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(SCRIPT), framework, storage, "ddp", str(tmp_path)]
    # a rank left waiting for a decision it never got fails in (or hangs on) the next collective
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    return optuna.load_study(study_name="ddp", storage=storage).trials[0], ranks


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_ddp_rank0_reports_once_and_every_rank_stops_at_the_same_step(framework: str, tmp_path: Path) -> None:
    for module in NEEDS[framework]:
        pytest.importorskip(module)
    trial, ranks = run_two_ranks(framework, tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]

    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [0, 1]  # one report per evaluation, by rank 0 only
    assert ranks[1]["spy_calls"] == []  # rank 1 never called the trial it was given

    # both ranks stopped after the second evaluation, at step 2 of 8
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert [r["max_steps"] for r in ranks] == [8, 8]
    assert [r["pruned"] for r in ranks] == [True, True]
    assert [r["evaluations"] for r in ranks] == [[0, 1], [0, 1]]

    attrs = trial.user_attrs
    assert attrs["train_steps"] == 2 and attrs["planned_steps"] == 8
    # tokens of both ranks' batches
    if framework == "hf":  # as the Trainer's own (gathered) non-padding count has them
        assert attrs["train_tokens"] == ranks[0]["num_input_tokens_seen"] > 0
    else:  # Lightning gives each rank a shuffling DistributedSampler (seed 0): 2 steps x 4 examples each
        assert attrs["train_tokens"] == lightning_ranks_tokens(steps=2, batch_size=4)
    assert attrs["trainable_params"] == ranks[0]["summary"]["trainable_params"] > 0
    assert attrs["tokens_per_second"] > 0 and attrs["peak_memory_total_bytes"] > 0
    assert ranks[1]["summary"]["train_tokens"] == attrs["train_tokens"]  # every rank holds the combined summary
