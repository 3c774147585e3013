"""LoraTuneCallback and LoraTuneLightningCallback: pruning in real Optuna studies with real
transformers Trainer, TRL SFTTrainer and Lightning runs on tiny models built from configs;
the shared decision logic (lora_tune.study.integrations.trial_binding) on its own. DDP: test_callbacks_ddp.py."""
from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
import torch

from lora_tune.errors import ConfigError
from lora_tune.study.integrations.trial_binding import TrialBinding, trial_pruning
from lora_tune.train.callbacks import EvalRecord, metric_key
from tests.study.callback_models import TokenSequences, tiny_lora_llama, training_args

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEASURED = ("trainable_params", "peak_memory_bytes", "peak_memory_total_bytes", "train_seconds", "throughput",
            "tokens_per_second", "train_tokens", "train_steps", "planned_steps", "metric_values")


class PruneSecondTrialAtSecondReport(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number == 1 and len(trial.intermediate_values) >= 2


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the shared decision logic ---------------------------------------------------------------------

def test_metric_key_takes_the_trainer_prefix_and_lists_what_was_returned() -> None:
    assert metric_key("eval_loss", {"eval_loss": 1.0}) == "eval_loss"
    assert metric_key("loss", {"eval_loss": 1.0}) == "eval_loss"
    with pytest.raises(ConfigError) as info:
        metric_key("eval_acc", {"eval_loss": 1.0, "epoch": 0.5})
    assert info.value.field == "metric" and "epoch, eval_loss" in str(info.value)


def test_pruning_reports_eval_indices_skips_non_finite_values_and_stops_reporting_once_pruned() -> None:
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=5.0))
    trial = study.ask()
    pruning = trial_pruning(trial, "eval_loss", None, None)
    assert not pruning.evaluated(10, {"eval_loss": 1.0})
    assert not pruning.evaluated(20, {"eval_loss": float("nan")})  # not reported, still counted
    assert pruning.evaluated(30, {"eval_loss": 9.0})  # over the threshold: prune
    assert pruning.evaluated(40, {"eval_loss": 9.5})  # after the decision: still stop, not reported
    assert study.trials[0].intermediate_values == {0: 1.0, 2: 9.0}
    assert pruning.pruned_at == EvalRecord(2, 30, 9.0)
    assert [e.step for e in pruning.evaluations] == [10, 20, 30]
    binding = TrialBinding()
    binding.trial, binding.pruning = trial, pruning
    with pytest.raises(optuna.TrialPruned, match=r"pruned after evaluation 2 \(step 30\)"):
        binding.raise_if_pruned()


@pytest.mark.parametrize("kwargs, field", [
    ({"report": lambda *a: False}, "report"),  # a trial and a report function
    ({"direction": "maximize"}, "direction"),  # the study minimizes
    ({"direction": "up"}, "direction"),
    ({"metric": None}, "metric"),
])
def test_pruning_rejects_inconsistent_arguments(kwargs: dict, field: str) -> None:
    trial = optuna.create_study(direction="minimize").ask()
    arguments = {"metric": "eval_loss", "report": None, "direction": None, **kwargs}
    with pytest.raises(ConfigError) as info:
        trial_pruning(trial, **arguments)
    assert info.value.field == field


def test_pruning_rejects_multi_objective_trials() -> None:
    trial = optuna.create_study(directions=["minimize", "minimize"]).ask()
    with pytest.raises(ConfigError, match="single-objective"):
        trial_pruning(trial, "eval_loss", None, None)


def test_the_core_modules_import_neither_transformers_nor_lightning_and_the_train_one_no_optuna() -> None:
    code = ("import sys, lora_tune.train.callbacks; "
            "print(sorted(m for m in ('transformers', 'lightning', 'trl', 'optuna') if m in sys.modules)); "
            "import lora_tune.study.integrations.trial_binding; "
            "print(sorted(m for m in ('transformers', 'lightning', 'trl') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["[]", "[]"]


# -- transformers Trainer --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def test_the_callbacks_are_exported_lazily(transformers) -> None:
    pytest.importorskip("lightning.pytorch")
    import lightning.pytorch as pl

    import lora_tune
    from lora_tune.study.integrations import lightning_pruning, transformers_pruning

    assert lora_tune.LoraTuneCallback is transformers_pruning.LoraTuneCallback
    assert lora_tune.LoraTuneLightningCallback is lightning_pruning.LoraTuneLightningCallback
    assert {"LoraTuneCallback", "LoraTuneLightningCallback"} <= set(lora_tune.__all__)
    assert issubclass(lora_tune.LoraTuneCallback, transformers.TrainerCallback)
    assert issubclass(lora_tune.LoraTuneLightningCallback, pl.Callback)


def hf_objective(transformers, tmp_path, seen: dict):
    """An objective as a user writes it: a fresh model, the callback, train, raise, score."""

    def objective(trial: optuna.Trial) -> float:
        model = tiny_lora_llama()
        callback = transformers_callback(trial)
        args = training_args(tmp_path / f"trial{trial.number}", include_num_input_tokens_seen="non_padding",
                             learning_rate=trial.suggest_float("learning_rate", 1e-3, 1e-1, log=True))
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenSequences(32, seed=0),
                                       eval_dataset=TokenSequences(8, seed=1), callbacks=[callback])
        trainer.train()
        seen[trial.number] = {"tokens": trainer.state.num_input_tokens_seen, "trainable": trainable(model),
                              "summary": callback.summary}
        callback.raise_if_pruned()
        return trainer.evaluate()["eval_loss"]  # outside train(): not reported

    return objective


def transformers_callback(*args, **kwargs):
    import lora_tune

    return lora_tune.LoraTuneCallback(*args, **kwargs)


def test_trainer_trials_complete_and_prune_with_their_measurements(transformers, tmp_path) -> None:
    study = optuna.create_study(pruner=PruneSecondTrialAtSecondReport(), sampler=optuna.samplers.RandomSampler(0))
    seen: dict = {}
    study.optimize(hf_objective(transformers, tmp_path, seen), n_trials=2)
    done, pruned = study.trials
    assert done.state == optuna.trial.TrialState.COMPLETE and pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(done.intermediate_values) == [0, 1, 2, 3, 4, 5]  # one report per in-training evaluation
    assert sorted(pruned.intermediate_values) == [0, 1]
    assert (done.user_attrs["train_steps"], done.user_attrs["planned_steps"]) == (6, 6)
    assert (pruned.user_attrs["train_steps"], pruned.user_attrs["planned_steps"]) == (2, 6)
    assert [(e.eval_index, e.step) for e in seen[1]["summary"].evaluations] == [(0, 1), (1, 2)]
    for trial in (done, pruned):
        attrs, measured = trial.user_attrs, seen[trial.number]
        assert set(MEASURED) <= set(attrs)
        assert attrs["trainable_params"] == measured["trainable"] > 0
        assert attrs["train_tokens"] == measured["tokens"] > 0  # the Trainer's own non-padding count
        assert attrs["tokens_per_second"] > 0 and attrs["throughput"] > 0
        assert attrs["peak_memory_total_bytes"] > 0 and attrs["peak_memory_bytes"] >= 0
        last = trial.intermediate_values[max(trial.intermediate_values)]
        assert math.isclose(attrs["metric_values"]["eval_loss"], last)
    assert done.value == pytest.approx(done.intermediate_values[5], rel=1e-4)  # the same model, evaluated again


def test_a_built_in_pruner_sees_evaluation_indices(transformers, tmp_path) -> None:
    """ThresholdPruner's warm-up counts reported steps: with 1 warm-up step it prunes at the
    second evaluation (index 1), not at the first (global step 1)."""
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=1))
    study.optimize(hf_objective(transformers, tmp_path, {}), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [0, 1] and trial.user_attrs["train_steps"] == 2


def test_a_report_function_replaces_the_trial(transformers, tmp_path) -> None:
    calls: list[tuple[int, int, float]] = []

    def report(step: int, eval_index: int, metrics: dict) -> bool:
        calls.append((step, eval_index, metrics["eval_loss"]))
        return eval_index == 2

    callback = transformers_callback(report=report, metric=None)
    args = training_args(tmp_path, include_num_input_tokens_seen="non_padding")
    trainer = transformers.Trainer(model=tiny_lora_llama(), args=args, train_dataset=TokenSequences(32, seed=0),
                                   eval_dataset=TokenSequences(8, seed=1), callbacks=[callback])
    trainer.train()
    assert [c[:2] for c in calls] == [(1, 0), (2, 1), (3, 2)]
    assert trainer.state.global_step == 3 and callback.summary.steps == 3
    assert callback.summary.tokens == trainer.state.num_input_tokens_seen > 0
    assert callback.summary.examples == 12
    with pytest.raises(optuna.TrialPruned, match=r"pruned after evaluation 2 \(step 3\)"):
        callback.raise_if_pruned()


def test_a_missing_metric_names_the_metrics_the_trainer_returned(transformers, tmp_path) -> None:
    trial = optuna.create_study().ask()
    callback = transformers_callback(trial, "eval_accuracy")
    trainer = transformers.Trainer(model=tiny_lora_llama(), args=training_args(tmp_path, max_steps=2),
                                   train_dataset=TokenSequences(8, seed=0), eval_dataset=TokenSequences(8, seed=1),
                                   callbacks=[callback])
    with pytest.raises(ConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert info.value.field == "metric" and "'eval_accuracy'" in message
    assert "eval_loss" in message and "eval_runtime" in message


def test_trl_sft_trainer_prunes(transformers, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from lora_tune import LoraConfig, inject
    from lora_tune.models.tiny_lm import build_chat_tokenizer, causal_lm_from_config, special_token_ids, tiny_config

    texts = ["What is 12 plus 35? 47", "Reverse the words: red blue green", "The capital of France is Paris",
             "Spell backwards: cat tac", "What is 9 minus 4? 5", "Q: what is 2 plus 2? A: 4"]
    tokenizer = build_chat_tokenizer(texts * 4, tmp_path / "tokenizer", vocab_size=300)
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=1))
    seen: dict = {}

    def objective(trial: optuna.Trial) -> float:
        config = tiny_config("llama", vocab_size=len(tokenizer), **special_token_ids(tokenizer))
        model = causal_lm_from_config(config)
        inject(model, LoraConfig(rank=trial.suggest_categorical("rank", [2, 4])))
        callback = transformers_callback(trial)
        args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=5, per_device_train_batch_size=4,
                             eval_strategy="steps", eval_steps=1, max_length=32, packing=False,
                             include_num_input_tokens_seen="non_padding", report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
        trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_dict({"text": texts * 4}),
                                 eval_dataset=Dataset.from_dict({"text": texts}), callbacks=[callback])
        trainer.train()
        seen.update(tokens=trainer.state.num_input_tokens_seen, trainable=trainable(model))
        callback.raise_if_pruned()
        return trainer.evaluate()["eval_loss"]

    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [0, 1]
    assert (trial.user_attrs["train_steps"], trial.user_attrs["planned_steps"]) == (2, 5)
    assert trial.user_attrs["train_tokens"] == seen["tokens"] > 0
    assert trial.user_attrs["trainable_params"] == seen["trainable"]


def test_a_prune_at_the_last_evaluation_completes_the_trainer_trial(transformers, tmp_path) -> None:
    """As in lora-tune's own trials: all steps were trained, so the trial keeps its result."""
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=5))
    study.optimize(hf_objective(transformers, tmp_path, {}), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert "last evaluation 5" in trial.user_attrs["prune_ignored"]
    assert (trial.user_attrs["train_steps"], trial.user_attrs["planned_steps"]) == (6, 6)
