"""text-classification on a tiny BERT written by the fixture, with CSV/TSV/JSONL files."""
from __future__ import annotations

import pytest
import torch

from lora_tune import LoraConfig, inject
from lora_tune.errors import ConfigError
from lora_tune.tasks import build_task, validate_task_spec
from lora_tune.tasks.hf import minilm_path, resolve_model_ref
from lora_tune.train import TrainConfig, fit
from tests.tasks.conftest import sentiment_rows, write_table


@pytest.fixture
def spec(tiny_bert_dir, tmp_path):
    return {
        "type": "text-classification", "model": str(tiny_bert_dir),
        "train_file": str(write_table(tmp_path / "train.csv", sentiment_rows(96, 0))),
        "eval_file": str(write_table(tmp_path / "eval.csv", sentiment_rows(40, 1))),
        "text_column": "sentence", "label_column": "sentiment", "max_length": 16,
    }


def test_build_maps_labels_and_finds_the_fresh_head(spec):
    task = build_task(spec)
    assert task.label_names == ["neg", "pos"]
    assert task.modules_to_save == ["classifier"]
    assert task.num_train_examples() == 96 and len(task.eval) == 40
    assert task.metrics == ("accuracy", "macro_f1") and task.default_direction == "maximize"
    batch = next(iter(task.train_batches(8, 0, 0)))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    # each batch is padded only to its own longest example
    assert int(batch["attention_mask"].sum(1).max()) == batch["input_ids"].shape[1]


def test_lora_training_learns_and_leaves_the_base_frozen(spec):
    task = build_task(spec)
    model = task.build_model()
    frozen_before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    head_before = model.classifier.weight.detach().clone()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inject(model, LoraConfig(rank=4, alpha=8, targets="attention-qv", modules_to_save=task.modules_to_save))
    result = fit(model, task, TrainConfig(epochs=6, batch_size=16, learning_rate=3e-2, evals_per_epoch=1))
    assert result.history[0]["accuracy"] <= 0.7 and result.final_metrics["accuracy"] >= 0.85
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    base = model.bert.encoder.layer[0].attention.self.query
    weight = base.base_layer.weight if hasattr(base, "base_layer") else base.weight
    assert torch.equal(weight, frozen_before)
    assert not torch.equal(model.classifier.weight, head_before)


def test_the_majority_class_and_the_label_prior_are_read_from_the_right_files(spec, tmp_path):
    import math

    rows = sentiment_rows(96, 0)
    spec["train_file"] = str(write_table(tmp_path / "skewed.csv", rows + [r for r in rows if r["sentiment"] == "pos"]))
    task = build_task(spec)
    shares = torch.bincount(task.train.labels).double() / len(task.train.labels)
    assert shares.max() > 0.6  # skewed on purpose
    assert task.prior_loss == pytest.approx(-sum(float(p) * math.log(float(p)) for p in shares))
    assert task.majority_accuracy == float(torch.bincount(task.eval.labels).max()) / len(task.eval)


def test_fresh_models_do_not_share_weights(spec):
    task = build_task(spec)
    a = task.build_model()
    with torch.no_grad():
        a.classifier.weight.zero_()
    assert task.build_model().classifier.weight.abs().sum() > 0


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_tsv_and_jsonl_files(spec, tmp_path, suffix):
    spec = dict(spec, train_file=str(write_table(tmp_path / f"t{suffix}", sentiment_rows(20, 3))),
                eval_file=str(write_table(tmp_path / f"e{suffix}", sentiment_rows(10, 4))),
                max_train_examples=12, max_eval_examples=6)
    task = build_task(spec)
    assert task.num_train_examples() == 12 and len(task.eval) == 6
    assert set(task.evaluate(task.build_model(), 4)) == {"accuracy", "macro_f1"}


def test_integer_labels_sort_numerically(spec, tmp_path):
    rows = [{"sentence": f"good movie {i}", "sentiment": str(label)} for i, label in enumerate([10, 2, 1, 2, 10])]
    path = str(write_table(tmp_path / "ints.csv", rows))
    task = build_task(dict(spec, train_file=path, eval_file=path))
    assert task.label_names == ["1", "2", "10"]


def test_every_problem_is_reported_with_its_path(spec, tmp_path):
    bad = dict(spec, train_file=str(tmp_path / "missing.csv"), text_column="body", max_length=0, colour="red")
    problems = dict(validate_task_spec(bad))
    assert "missing.csv" in problems["task.train_file"] and "not found" in problems["task.train_file"]
    assert "'body'" in problems["task.text_column"] and "sentence" in problems["task.text_column"]
    assert "task.max_length" in problems and "task.colour" in problems
    missing = dict(validate_task_spec({"type": "text-classification"}))
    assert {"task.model", "task.train_file", "task.eval_file"} <= set(missing)
    with pytest.raises(ConfigError) as info:
        build_task(bad)
    assert info.value.field in problems and "4 problem(s)" in str(info.value)


def test_unseen_eval_label_is_an_error(spec, tmp_path):
    rows = sentiment_rows(4, 5) + [{"sentence": "the plot", "sentiment": "meh"}]
    with pytest.raises(ConfigError, match="meh"):
        build_task(dict(spec, eval_file=str(write_table(tmp_path / "odd.csv", rows))))


def test_models_are_never_downloaded(tmp_path):
    problems = dict(validate_task_spec({"type": "text-classification", "model": "nobody/not-a-real-model-xyz",
                                        "train_file": "x.csv", "eval_file": "y.csv"}))
    assert "never downloads" in problems["task.model"]
    assert "not found" in dict(validate_task_spec({"type": "text-classification",
                                                   "model": str(tmp_path / "nope")}))["task.model"]
    (tmp_path / "empty").mkdir()
    assert "config.json" in dict(validate_task_spec({"type": "text-classification",
                                                     "model": str(tmp_path / "empty")}))["task.model"]


def test_minilm_alias_points_at_the_packaged_model():
    path = minilm_path()
    assert path is not None and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_ref("minilm") == str(path)


def test_a_list_of_files_is_refused(spec):
    problems = dict(validate_task_spec(dict(spec, train_file=[spec["train_file"]])))
    assert "file path" in problems["task.train_file"]


@pytest.mark.slow
def test_minilm_alias_builds_and_trains(tmp_path):
    spec = {"type": "text-classification", "model": "minilm", "max_length": 16,
            "train_file": str(write_table(tmp_path / "train.csv", sentiment_rows(16, 0))),
            "eval_file": str(write_table(tmp_path / "eval.csv", sentiment_rows(8, 1))),
            "text_column": "sentence", "label_column": "sentiment"}
    task = build_task(spec)
    assert task.modules_to_save == ["classifier"]
    model = task.build_model()
    report = inject(model, LoraConfig(rank=4, alpha=8, targets="all-linear", modules_to_save=task.modules_to_save))
    assert len(report.targets) == 37  # 6 layers x (q, k, v, o, 2 MLP) + the pooler
    result = fit(model, task, TrainConfig(epochs=1, batch_size=8, max_steps=2, evals_per_epoch=1))
    assert result.steps == 2 and set(result.final_metrics) == {"accuracy", "macro_f1"}
