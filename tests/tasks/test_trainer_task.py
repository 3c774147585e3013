"""The ``trainer`` task: a user's real transformers.Trainer / trl.SFTTrainer inside a study."""
from __future__ import annotations

import copy

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lora_tune.study.trial.objective import Objective, TrialFailed
from lora_tune.study.schema.spec import resolve_objective, validate_spec
from lora_tune.tasks import build_task, validate_task_spec
from tests.tasks import trainer_factories

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FACTORIES = "tests/tasks/trainer_factories.py"
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
PARAMS = {"rank": 4, "alpha_ratio": 2.0, "targets": "attention-qv", "learning_rate": 5e-3}


def _raw(factory: str = "make_trainer", args: dict | None = None, **task) -> dict:
    return {
        "study": {"name": "trainer-test", "n_trials": 3, "sampler": {"type": "random", "seed": 0},
                  "pruner": {"type": "none"}},
        "task": {"type": "trainer", "factory": f"{FACTORIES}:{factory}", "args": args or {},
                 "model": {"config": LLAMA}, "tokenizer": "studies/data/sft/tokenizer", **task},
        "search_space": {"rank": {"choices": [4, 8]}, "alpha": {"ratio": [1, 2]},
                         "targets": {"choices": ["attention-qv", "all-linear"]},
                         "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "train": {"device": "cpu", "threads": 1},
    }


@pytest.fixture(scope="module")
def trainer_task():
    return build_task(dict(_raw()["task"]))


class PruneTrialAtReport(optuna.pruners.BasePruner):
    """Prunes trial ``number`` once it has ``reports`` intermediate values."""

    def __init__(self, number: int, reports: int = 2):
        self.number, self.reports = number, reports

    def prune(self, study, trial):
        return trial.number == self.number and len(trial.intermediate_values) >= self.reports


def _run(raw: dict, task, n_trials: int, pruner=None, params=PARAMS) -> optuna.Study:
    spec = resolve_objective(validate_spec(raw), task)
    study = optuna.create_study(direction="minimize", pruner=pruner or optuna.pruners.NopPruner())
    for _ in range(n_trials):
        study.enqueue_trial(params)
    study.optimize(Objective(spec, task), n_trials=n_trials, catch=(TrialFailed,))
    return study


def test_a_study_of_real_trainer_trials_completes_and_prunes(trainer_task):
    study = _run(_raw(), trainer_task, 2, PruneTrialAtReport(1))
    done, pruned = study.trials
    assert done.state == TrialState.COMPLETE, done.user_attrs.get("fail_reason")
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["train_steps"] < pruned.user_attrs["planned_steps"] == done.user_attrs["planned_steps"]
    assert list(pruned.intermediate_values) == [0, 1]
    # 64 examples, the factory's batch 8, 1 epoch, an evaluation every 2 steps (the trainer's
    # evaluations during training are reported; the value is a final evaluate() of the same model)
    assert done.user_attrs["planned_steps"] == done.user_attrs["train_steps"] == 8
    assert list(done.intermediate_values) == [0, 1, 2, 3]
    assert done.value == pytest.approx(done.intermediate_values[3])
    # r=4 on 2 layers' q_proj (64 -> 64) and v_proj (64 -> 32 rows: 2 key/value heads)
    assert done.user_attrs["trainable_params"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert done.user_attrs["tokens_per_second"] > 0 and done.user_attrs["train_tokens"] > 0
    assert done.user_attrs["peak_memory_total_bytes"] > 0


def test_the_best_trainer_adapter_exports_and_reloads_with_the_same_metric(trainer_task, tmp_path):
    from lora_tune import load_adapter
    from lora_tune.study.trial.artifacts import artifact_dir_for, extract_adapter

    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = resolve_objective(validate_spec(_raw()), trainer_task)
    study = optuna.create_study(direction="minimize", storage=storage, study_name="export")
    study.enqueue_trial(PARAMS)
    study.optimize(Objective(spec, trainer_task), n_trials=1, catch=(TrialFailed,))
    best = study.best_trial
    extract_adapter(study, best, tmp_path / "adapter", artifact_dir_for(study, storage))
    model = trainer_task.build_model()
    load_adapter(model, tmp_path / "adapter" / "lora-tune")
    trainer = trainer_factories.make_trainer(model=model, tokenizer=trainer_task.tokenizer, params={}, callbacks=[],
                                             output_dir=str(tmp_path / "out"))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(best.value, abs=1e-5)


def test_sft_trainer_trials_complete_and_prune():
    raw = _raw("make_sft_trainer")
    task = build_task(dict(raw["task"]))
    study = _run(raw, task, 2, PruneTrialAtReport(1))
    done, pruned = study.trials
    assert done.state == TrialState.COMPLETE, done.user_attrs.get("fail_reason")
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["train_steps"] < pruned.user_attrs["planned_steps"]
    assert done.value > 0 and done.user_attrs["tokens_per_second"] > 0


def test_the_studys_training_settings_reach_the_trainers_arguments(trainer_task, monkeypatch):
    built = []
    original = trainer_factories.make_trainer

    def recording(**kwargs):
        trainer = original(**kwargs)
        built.append(trainer)
        return trainer

    monkeypatch.setattr(trainer_factories, "make_trainer", recording)
    raw = _raw()
    raw["train"].update({"batch_size": 4, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
                         "warmup_ratio": 0.25, "loraplus_lr_ratio": 16, "max_steps": 4})
    task = copy.copy(trainer_task)
    task.factory = recording
    trial = _run(raw, task, 1).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    args = built[0].args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_steps) == (4, 2, 4)
    assert str(args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value") else args.lr_scheduler_type) \
        == "cosine" and args.warmup_steps == 0.25
    assert args.learning_rate == pytest.approx(PARAMS["learning_rate"])
    assert args.per_device_eval_batch_size == 16  # not a study setting: the factory's own value stays
    groups = {g["name"]: g for g in built[0].optimizer.param_groups}
    assert groups["lora_B"]["initial_lr"] == pytest.approx(16 * PARAMS["learning_rate"])
    assert trial.user_attrs["effective_batch_size"] == 8 and trial.user_attrs["train_steps"] == 4


@pytest.mark.parametrize("args, reason", [
    ({"explode": True}, "RuntimeError: the user's factory exploded"),
    ({"not_a_trainer": True}, "returned a dict, not a transformers.Trainer"),
])
def test_a_factory_that_fails_or_returns_no_trainer_fails_the_trial_and_the_study_goes_on(trainer_task, args, reason):
    task = copy.copy(trainer_task)
    task.args = args
    study = _run(_raw(), task, 1)
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL and reason in trial.user_attrs["fail_reason"]


def test_a_metric_the_trainer_does_not_return_lists_those_it_does(trainer_task):
    task = copy.copy(trainer_task)
    task.metrics, task.default_metric = ("eval_accuracy",), "eval_accuracy"
    raw = _raw(metrics=["eval_accuracy"])
    trial = _run(raw, task, 1).trials[0]
    assert trial.state == TrialState.FAIL
    assert "eval_accuracy" in trial.user_attrs["fail_reason"] and "eval_loss" in trial.user_attrs["fail_reason"]


@pytest.mark.parametrize("task, path", [
    ({"factory": f"{FACTORIES}:no_such_function"}, "task.factory"),
    ({"factory": "missing_file.py:make_trainer"}, "task.factory"),
    ({"factory": "not a reference"}, "task.factory"),
    ({"model": None}, "task.model"),
    ({"injector": "loralib"}, "task.injector"),
    ({"args": {"model": 1}}, "task.args"),
])
def test_bad_task_keys_are_found_before_anything_runs(task, path):
    spec = {**_raw()["task"], **task}
    spec = {k: v for k, v in spec.items() if v is not None}
    assert path in [p for p, _ in validate_task_spec(spec)]


def test_transformers_still_caches_the_train_batch_size_where_lora_tune_resets_it(trainer_task, tmp_path):
    """apply_training_arguments resets Trainer._train_batch_size as transformers' own search
    does; a transformers release without it must fail here, loudly."""
    trainer = trainer_factories.make_trainer(model=trainer_task.build_model(), tokenizer=trainer_task.tokenizer,
                                             params={}, callbacks=[], output_dir=str(tmp_path))
    assert trainer._train_batch_size == trainer.args.train_batch_size
    assert callable(trainer.create_accelerator_and_postprocess)


def test_the_model_given_to_the_factory_is_the_adapted_copy(trainer_task):
    seen = []
    task = copy.copy(trainer_task)

    def factory(model, **kwargs):
        seen.append(model)
        return trainer_factories.make_trainer(model=model, **kwargs)

    task.factory = factory
    _run(_raw(), task, 1)
    names = [n for n, p in seen[0].named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for n, p in seen[0].named_parameters() if "lora_" not in n)
    assert isinstance(seen[0], torch.nn.Module)


def _peft_task(trainer_task):
    task = copy.copy(trainer_task)
    task.injector = "peft"
    return task


def test_injector_peft_trains_through_peft_and_exports_a_peft_adapter(trainer_task):
    study = _run(_raw(injector="peft"), _peft_task(trainer_task), 1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    ours = _run(_raw(), trainer_task, 1).trials[0]
    assert trial.user_attrs["target_modules"] == ours.user_attrs["target_modules"]
    assert trial.user_attrs["trainable_params"] == ours.user_attrs["trainable_params"]
    # Same seed and config; the LoRA A factors are initialised by different code (so differ), and
    # after 8 steps the two eval losses agree to 1 % (measured: 5.8878 vs 5.8768, 0.19 %).
    assert trial.value == pytest.approx(ours.value, rel=1e-2)


def test_injector_peft_and_lora_tune_train_identically_from_the_same_initial_factors(trainer_task):
    """The trainer task's two injectors are the same computation: PEFT's model given lora-tune's
    initial A and B (with B non-zero so that every step differs) trains to the same eval loss."""
    from lora_tune import LoraConfig
    from lora_tune.tasks.trainer import peft_adapt
    from lora_tune.train import TrainConfig

    config = LoraConfig(rank=4, alpha=8, targets="attention-qv", init="gaussian")
    ours, report = trainer_task.adapt(trainer_task.build_model(), config)
    torch.manual_seed(3)
    for name, _ in report.targets:
        ours.get_submodule(name).lora_B.data.normal_(0, 0.02)
    theirs, _ = peft_adapt(trainer_task.build_model(), config)
    for name, _ in report.targets:
        mine, peft_layer = ours.get_submodule(name), theirs.get_submodule(f"base_model.model.{name}")
        peft_layer.lora_A["default"].weight.data.copy_(mine.lora_A.data)
        peft_layer.lora_B["default"].weight.data.copy_(mine.lora_B.data)
    train = TrainConfig(device="cpu")
    values = []
    for model in (ours, theirs):
        trainer_task.train_adapted(model, train, lambda *a: False, params={}, explicit=("device",))
        trainer = trainer_factories.make_trainer(model=model, tokenizer=trainer_task.tokenizer, params={},
                                                 callbacks=[], output_dir="/tmp/lora-tune-equal")
        values.append(trainer.evaluate()["eval_loss"])
    assert values[0] == pytest.approx(values[1], abs=1e-4)


def test_injector_peft_refuses_quant_bits_with_the_reason(trainer_task):
    raw = _raw(injector="peft")
    raw["search_space"]["quant_bits"] = {"choices": [None, 8]}
    study = _run(raw, _peft_task(trainer_task), 1, params={**PARAMS, "quant_bits": 8})
    trial = study.trials[0]
    assert trial.state == TrialState.FAIL and "quant_bits" in trial.user_attrs["fail_reason"]


# -- existing scripts, first try (issue 19) ---------------------------------------------------------

def _absolute(raw: dict) -> dict:
    """``raw`` with its factory and tokenizer as absolute paths (for a test in another directory)."""
    task = raw["task"]
    task["factory"] = str(trainer_factories.ROOT / task["factory"])
    task["tokenizer"] = str(trainer_factories.ROOT / task["tokenizer"])
    return raw


@pytest.mark.parametrize("injector, option, named", [
    ("lora-tune", "peft_config", "was given peft_config"),
    ("peft", "peft_config", "was given peft_config"),
    ("lora-tune", "wrap_in_peft", "is a PEFT model made of the model lora-tune adapted"),
])
def test_an_sft_trainer_that_would_adapt_the_model_again_fails_its_first_trial_naming_the_fix(injector, option, named):
    """A real TRL SFTTrainer given ``peft_config`` (TRL then calls get_peft_model on the adapted
    model and PEFT refuses lora-tune's wrappers; with injector: peft TRL refuses a PeftModel), or a
    factory that makes a PeftModel itself: the first trial fails with what to remove."""
    raw = _raw("make_sft_trainer", {option: True}, injector=injector)
    task = build_task(dict(raw["task"]))
    trial = _run(raw, task, 1).trials[0]
    reason = trial.user_attrs["fail_reason"]
    assert trial.state == TrialState.FAIL and reason.startswith("AdaptedAgainError: task.factory (")
    assert named in reason and "lora-tune adapts the model itself" in reason
    assert ("remove peft_config=..." in reason) == (option == "peft_config")
    assert "search_space sets rank, alpha, targets" in reason
    assert "\n" not in reason  # one clear sentence, not PEFT's module dump


def test_a_failure_reason_is_kept_whole_and_shortened_only_where_it_is_shown(trainer_task):
    from types import SimpleNamespace

    from lora_tune.study.run.progress import trial_line
    from lora_tune.study.trial import record

    message = "first line\n" + "\n".join(f"detail {i}: " + "x" * 80 for i in range(40)) + "\nthe fix: do this"
    task = copy.copy(trainer_task)
    task.args = {"explode": message}
    trial = _run(_raw(), task, 1).trials[0]
    assert trial.user_attrs["fail_reason"] == f"RuntimeError: {message}"  # every line
    shown = record.short_reason(trial.user_attrs["fail_reason"])
    assert "\n" not in shown and len(shown) == record.SHORT_REASON_LIMIT
    assert shown.startswith("RuntimeError: first line detail 0:") and shown.endswith("the fix: do this")
    line = trial_line(trial, SimpleNamespace(metrics=["eval_loss"]))
    assert shown in line and "\n" not in line
    huge = record.stored_reason("y" * 20_000 + " the end")
    assert len(huge) == record.FAIL_REASON_LIMIT and huge.endswith(" the end")


def test_a_trial_writes_no_checkpoint_even_when_the_script_saves_every_few_steps(tmp_path, monkeypatch):
    """The script saves checkpoints every 2 steps into a directory of its own; in a trial the
    Trainer writes nothing there (lora-tune keeps the adapter), and nothing is left behind."""
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "script-output"
    raw = _absolute(_raw("make_sft_trainer", {"save_to": str(own)}))
    trial = _run(raw, build_task(dict(raw["task"])), 1).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["train_steps"] == 8  # 4 checkpoints, had the script's saving applied
    written = [p for p in tmp_path.rglob("*") if p.name.startswith("checkpoint-") or p.suffix == ".safetensors"]
    assert written == []


def test_a_trl_parser_script_gets_its_command_line_from_task_args_argv():
    argv = ["--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--learning_rate", "1e-3",
            "--eval_strategy", "steps", "--eval_steps", "2", "--max_length", "64", "--report_to", "none",
            "--logging_strategy", "no", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0",
            "--assistant_only_loss", "false", "--train_rows", "32", "--output_dir", "ignored-by-lora-tune"]
    raw = _raw("make_trl_script_trainer", {"argv": argv})
    trial = _run(raw, build_task(dict(raw["task"])), 1).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["planned_steps"] == 4 and list(trial.intermediate_values) == [0, 1]


def test_library_warnings_of_a_trial_go_to_its_log_not_to_the_output(tmp_path, monkeypatch, capfd):
    """TRL's "model_init_kwargs ... will be ignored" (a log record) and transformers'
    gradient_checkpointing FutureWarning (warnings.warn), both raised by the factory's real
    SFTConfig/SFTTrainer: kept in the trial's ``trial_log``, not printed by ``lora-tune run``."""
    import yaml
    from click.testing import CliRunner

    from lora_tune.cli.main import cli
    from lora_tune.study.trial import record

    raw = _absolute(_raw("make_sft_trainer", {"model_init_kwargs": True, "n_train": 16, "n_eval": 8}))
    storage = f"sqlite:///{tmp_path / 'warn.db'}"
    raw["study"].update(n_trials=1, storage=storage)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_TUNE_STORAGE", raising=False)
    capfd.readouterr()
    result = CliRunner().invoke(cli, ["run", "study.yaml"], catch_exceptions=False)
    printed = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="trainer-test", storage=storage).trials[0]
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert "model_init_kwargs" not in printed and "gradient_checkpointing" not in printed, printed
    log = trial.user_attrs[record.TRIAL_LOG]
    assert any("model_init_kwargs" in e and "will be ignored" in e for e in log), log
    assert any(e.startswith("FutureWarning:") and "gradient_checkpointing" in e for e in log), log
