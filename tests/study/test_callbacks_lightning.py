"""LoraTuneLightningCallback in a real Optuna study with a tiny lightning.pytorch module (CPU, one
device): a pruned trial stops early and ends PRUNED, the other completes; measurements recorded."""
from __future__ import annotations

import optuna
import pytest

from lora_tune.errors import ConfigError
from tests.study.callback_models import TokenSequences

pytest.importorskip("lightning.pytorch")

from tests.study.lightning_models import MAX_STEPS, fit  # after the skip: needs lightning

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PruneSecondTrialAtSecondReport(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1 and len(trial.intermediate_values) >= 2


def test_lightning_trials_complete_and_prune(tmp_path) -> None:
    import lora_tune

    steps: dict[int, int] = {}

    def objective(trial: optuna.Trial) -> float:
        callback = lora_tune.LoraTuneLightningCallback(trial, "val_loss")
        trainer = fit(callback, tmp_path)
        steps[trial.number] = trainer.global_step
        callback.raise_if_pruned()
        return float(trainer.callback_metrics["val_loss"])

    study = optuna.create_study(pruner=PruneSecondTrialAtSecondReport())
    study.optimize(objective, n_trials=2)
    done, pruned = study.trials
    assert done.state == optuna.trial.TrialState.COMPLETE and pruned.state == optuna.trial.TrialState.PRUNED
    assert steps == {0: MAX_STEPS, 1: 2}
    # the sanity check is not reported: one value per validation during training
    assert sorted(done.intermediate_values) == list(range(MAX_STEPS))
    assert sorted(pruned.intermediate_values) == [0, 1]
    assert (done.user_attrs["train_steps"], done.user_attrs["planned_steps"]) == (MAX_STEPS, MAX_STEPS)
    assert (pruned.user_attrs["train_steps"], pruned.user_attrs["planned_steps"]) == (2, MAX_STEPS)
    data = TokenSequences(32, seed=0)
    assert done.user_attrs["train_tokens"] == int(data.lengths[: 4 * MAX_STEPS].sum())  # unshuffled batches
    assert pruned.user_attrs["train_tokens"] == int(data.lengths[:8].sum())
    assert done.user_attrs["trainable_params"] == 16 * 64 + 64  # the head; the embedding is frozen
    assert done.user_attrs["tokens_per_second"] > 0 and done.user_attrs["peak_memory_total_bytes"] > 0


def test_lightning_missing_monitor_lists_the_logged_metrics(tmp_path) -> None:
    from lora_tune.study.integrations.lightning_pruning import LoraTuneLightningCallback

    callback = LoraTuneLightningCallback(optuna.create_study().ask(), "val_acc")
    with pytest.raises(ConfigError) as info:
        fit(callback, tmp_path)
    assert info.value.field == "monitor" and "'val_acc'" in str(info.value) and "val_loss" in str(info.value)
