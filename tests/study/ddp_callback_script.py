"""Run by tests/study/test_callbacks_ddp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Every rank trains the same tiny model, with transformers' Trainer and a LoraTuneCallback
(FRAMEWORK ``hf``) or with Lightning's DDP strategy and a LoraTuneLightningCallback
(``lightning``), validating after every step. Rank 0 runs one trial of the Optuna study in
STORAGE (its pruner prunes at the second report); rank 1 gives the callback a spy "trial" that
writes down any call made to it. Each rank writes OUT/rank<r>.json: its final global step,
whether it was pruned, its summary and the spy's calls.

    python -m torch.distributed.run --nproc_per_node 2 ddp_callback_script.py FRAMEWORK STORAGE STUDY OUT
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import optuna
import torch

from lora_tune.study.trial import record
MAX_STEPS = 8


class PruneAtSecondReport(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return len(trial.intermediate_values) >= 2


class SpyTrial:
    """Stands in for a trial on rank 1: the callback must never call it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def report(self, value: float, step: int) -> None:
        self.calls.append(f"report({value}, {step})")

    def should_prune(self) -> bool:
        self.calls.append("should_prune()")
        return False

    def set_user_attr(self, key: str, value: object) -> None:
        self.calls.append(f"set_user_attr({key!r})")


def train_hf(trial: Any, out: Path) -> tuple[Any, dict]:
    from transformers import Trainer

    from lora_tune.study.integrations.transformers_pruning import LoraTuneCallback
    from tests.study.callback_models import TokenSequences, tiny_lora_llama, training_args

    callback = LoraTuneCallback(trial)
    args = training_args(out / "trainer", max_steps=MAX_STEPS, ddp_backend="gloo",
                         include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=tiny_lora_llama(), args=args, train_dataset=TokenSequences(64, seed=0),
                      eval_dataset=TokenSequences(16, seed=1), callbacks=[callback])
    trainer.train()
    return callback, {"global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
                      "num_input_tokens_seen": trainer.state.num_input_tokens_seen}


def train_lightning(trial: Any, out: Path) -> tuple[Any, dict]:
    from lora_tune.study.integrations.lightning_pruning import LoraTuneLightningCallback
    from tests.study.lightning_models import fit

    callback = LoraTuneLightningCallback(trial, "val_loss")
    trainer = fit(callback, out, max_steps=MAX_STEPS, devices=2, strategy="ddp")
    return callback, {"global_step": trainer.global_step, "max_steps": trainer.max_steps}


def main(framework: str, storage: str, study_name: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    train = {"hf": train_hf, "lightning": train_lightning}[framework]
    spy = SpyTrial()
    result: dict = {"rank": rank}

    def objective(trial: Any) -> float:
        callback, facts = train(trial, out)
        summary = callback.summary
        result.update(facts, pruned=callback.pruned,
                      summary={"trainable_params": summary.trainable_params, **record.run_attrs(summary)},
                      evaluations=[e.eval_index for e in callback.summary.evaluations],
                      world_size=torch.distributed.get_world_size())
        callback.raise_if_pruned()
        return next(iter(callback.summary.final_metrics.values()))

    if rank == 0:
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=PruneAtSecondReport())
        study.optimize(objective, n_trials=1)
    else:
        with contextlib.suppress(optuna.TrialPruned):
            objective(spy)
    result["spy_calls"] = spy.calls
    (out / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
