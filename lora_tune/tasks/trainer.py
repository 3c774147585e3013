"""``trainer``: your own Hugging Face ``Trainer`` (or TRL ``SFTTrainer``) inside a LoRA search.

Spec keys::

    type: trainer
    factory: my_train.py:make_trainer    # or package.module:function
    args: {max_length: 256}              # optional keyword arguments for the factory
    model: path/to/hf-model-dir          # a local directory, or {config: {model_type: llama, ...}}
    # model_factory: my_train.py:make_model   # instead of model: a function returning the base model
    model_class: causal-lm               # causal-lm | sequence-classification (with model:)
    num_labels: 2                        # sequence-classification only
    tokenizer: path/to/tokenizer-dir     # optional (default: the model directory); passed to the factory
    dtype: auto                          # auto | bfloat16 | float16 | float32 (weights as loaded)
    injector: lora-tune                  # lora-tune | peft: who adapts the model
    metrics: [eval_loss]                 # what trainer.evaluate() returns that a study may optimize
    modules_to_save: [score]             # optional: trained fully (default: freshly initialised heads)
    seed: 0                              # config: initialisation

Per trial lora-tune copies the base model, adapts it with the trial's LoRA config (its own
injector, or PEFT's ``get_peft_model`` with :meth:`LoraConfig.to_peft` for ``injector: peft``)
and calls ``factory(model=..., tokenizer=..., params=..., callbacks=[...], output_dir=..., **args)``,
which returns a ``transformers.Trainer``. ``params`` holds the trial's sampled values. Every
training setting that the study sets (in ``train:`` or in ``search_space``) then replaces the
trainer's ``TrainingArguments`` value (:data:`TRAINING_ARGUMENTS`), LoRA+ included, so the
factory cannot silently train with other settings than the trial records. The callback reports
every evaluation to the study and stops training when the trial is pruned; the trial's value is
``trainer.evaluate()[metric]``.

``factory`` is imported when the study is checked (a missing one is exit 2 at ``validate``);
what it returns is checked in the trial (not a Trainer, or a trainer that would adapt the model
again - a ``peft_config`` given, a PeftModel made of it: the trial fails with that reason).
An argparse / ``TrlParser`` script takes ``args: {argv: [...]}`` (a factory parameter ``argv``).
A trial writes no checkpoint (:func:`trial_outputs`), and the library warnings and log records of
the factory and the training go to the trial's ``trial_log`` instead of the output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterator, Mapping

import torch

from lora_tune.errors import ConfigError, LoraTuneError
from lora_tune.quiet import captured_library_output
from lora_tune.settings import settings_of
from lora_tune.tasks.base import (
    Field, ModelTemplate, Problems, Task, check_spec, is_choice, is_int, is_str_list, metric_direction,
)
from lora_tune.tasks.hf import (
    MODEL_LOAD, TOKENIZER_LOAD, check_model_or_config, check_tokenizer_ref, fresh_module_names, quiet_transformers,
    resolve_model_ref,
)
from lora_tune.train import TrainConfig

# Libraries a trial's child process needs: its fork server imports them once (study/trial/trial_process.py).
HEAVY_IMPORTS = ("transformers", "transformers.modeling_utils", "transformers.trainer")

MODEL_CLASSES = ("causal-lm", "sequence-classification")
INJECTORS = ("lora-tune", "peft")
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# lora-tune's optimizer names -> TrainingArguments.optim
HF_OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw": "paged_adamw_32bit",
                 "paged_adamw_8bit": "paged_adamw_8bit"}


def _check_factory(value: Any) -> str | None:
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        return f"must be 'path/to/file.py:function' or 'package.module:function', got {value!r}"
    from lora_tune.tasks.python_factory import load_factory

    try:
        load_factory(value)
    except ConfigError as exc:
        return str(exc).split(": ", 1)[-1]
    return None


def _check_args(value: Any) -> str | None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return f"must be a mapping of keyword arguments for the factory, got {value!r}"
    reserved = sorted(set(value) & set(FACTORY_KWARGS))
    return f"must not set {', '.join(reserved)} (lora-tune passes them)" if reserved else None


FACTORY_KWARGS = ("model", "tokenizer", "params", "callbacks", "output_dir")

FIELDS = {
    "type": Field(is_choice(("trainer",)), required=True),
    "factory": Field(_check_factory, required=True, help="'my_train.py:make_trainer'"),
    "args": Field(_check_args),
    "model": Field(check_model_or_config),
    "model_factory": Field(_check_factory),
    "model_class": Field(is_choice(MODEL_CLASSES)),
    "num_labels": Field(is_int(1)),
    "tokenizer": Field(check_tokenizer_ref),
    "dtype": Field(is_choice(tuple(DTYPES))),
    "injector": Field(is_choice(INJECTORS)),
    "metrics": Field(is_str_list),
    "modules_to_save": Field(is_str_list),
    "seed": Field(is_int(0)),
}


def validate_spec(spec: Any) -> Problems:
    problems = check_spec(spec, FIELDS)
    if not isinstance(spec, Mapping):
        return problems
    if (spec.get("model") is None) == (spec.get("model_factory") is None):
        problems.append(("task.model", "give exactly one of model (a directory or {config: ...}) or model_factory"))
    if spec.get("model_factory") is not None:
        for key in ("model_class", "num_labels", "dtype"):
            if spec.get(key) is not None:
                problems.append((f"task.{key}", "applies to model:, not to model_factory"))
    if spec.get("num_labels") is not None and spec.get("model_class", "causal-lm") != "sequence-classification":
        problems.append(("task.num_labels", "applies to model_class: sequence-classification only"))
    return problems


@dataclass(frozen=True)
class TrainingArgument:
    """How one lora-tune training setting becomes ``TrainingArguments`` values."""

    names: tuple[str, ...]
    convert: Callable[[Any, Any], dict[str, Any]]


def _warmup(config: Any) -> Any:
    # TrainingArguments.warmup_steps: an int is a step count, a float below 1 a ratio.
    return config.warmup_steps if config.warmup_steps is not None else float(config.warmup_ratio)


# The settings whose TrainingArguments value differs from lora-tune's: (value, config) -> its value
# (the field names are TrainConfig's ``hf``) ...
_VALUES: dict[str, Callable[[Any, Any], Any]] = {
    "epochs": lambda v, c: float(v),
    "max_steps": lambda v, c: -1 if v is None else v,
    "lr_scheduler": lambda v, c: "constant_with_warmup" if v == "constant" and _warmup(c) else v,
    "warmup_ratio": lambda v, c: _warmup(c),
    "warmup_steps": lambda v, c: _warmup(c),
    "grad_clip": lambda v, c: 0.0 if v is None else v,
    "optimizer": lambda v, c: HF_OPTIMIZERS[v],
    "device": lambda v, c: v == "cpu",
}
# ... and those that set several fields: (value, config) -> {field: value}
_SEVERAL: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "precision": lambda v, c: {"bf16": v == "bf16", "fp16": v == "fp16"} if v != "auto" else {},
    "gradient_checkpointing": lambda v, c: {"gradient_checkpointing": v,
                                            "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "eval_steps": lambda v, c: {"eval_strategy": "steps", "eval_steps": v} if v is not None else {},
}


def _argument(key: str, names: tuple[str, ...]) -> TrainingArgument:
    if key in _SEVERAL:
        return TrainingArgument(names, _SEVERAL[key])
    value = _VALUES.get(key, lambda v, c: v)
    return TrainingArgument(names, lambda v, c: {names[0]: value(v, c)})


# lora-tune training setting -> TrainingArguments fields (what the study sets reaches the trainer)
TRAINING_ARGUMENTS: dict[str, TrainingArgument] = {
    key: _argument(key, rule.hf) for key, rule in settings_of(TrainConfig).items() if rule.hf}


# TrainingArguments fields that newer transformers renamed (the old name stays as an alias that is
# read only at construction): both are set.
RENAMED = {"gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def training_overrides(config: Any, keys: Any) -> dict[str, Any]:
    """``TrainingArguments`` values for the training settings named in ``keys``."""
    out: dict[str, Any] = {}
    for key in keys:
        rule = TRAINING_ARGUMENTS.get(key)
        if rule is not None:
            out.update(rule.convert(getattr(config, key), config))
    return out


def apply_training_arguments(trainer: Any, overrides: Mapping[str, Any]) -> None:
    """Set ``overrides`` on ``trainer.args`` and rebuild what the trainer derived from them at
    construction (its train batch size and its accelerator's gradient accumulation), as
    transformers' own hyperparameter search does."""
    for name, value in overrides.items():
        names = [n for n in (name, RENAMED.get(name)) if n is not None and hasattr(trainer.args, n)]
        if not names:
            raise ConfigError("train", name, "settings that transformers' TrainingArguments has",
                              f"this transformers version has no TrainingArguments.{name}")
        for attr in names:
            setattr(trainer.args, attr, value)
    if hasattr(trainer, "_train_batch_size"):  # transformers' own cache of it (see test_trainer_task)
        trainer._train_batch_size = trainer.args.train_batch_size
    trainer.create_accelerator_and_postprocess()


class TrainerTask(Task):
    """See the module docstring."""

    name = "trainer"
    baseline_targets = "attention-qv"

    def __init__(self, spec: dict):
        from lora_tune.tasks.python_factory import load_factory

        self.spec = spec
        self.factory = load_factory(spec["factory"])
        self.args = dict(spec.get("args") or {})
        self.injector = spec.get("injector") or "lora-tune"
        self.metrics = tuple(spec.get("metrics") or ("eval_loss",))
        self.default_metric = self.metrics[0]
        self.default_direction = metric_direction(self.default_metric)
        self.tokenizer = self._tokenizer()
        model, fresh = self._base_model()
        self.modules_to_save = list(spec.get("modules_to_save") or fresh)
        self.weight_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        self.template = ModelTemplate(model)
        self.warnings: list[str] = []
        self.adapt_log: list[str] = []  # what the last adapt() kept of library output

    # -- the base model ------------------------------------------------------------------------
    def _tokenizer(self) -> Any:
        ref = (self.spec.get("tokenizer")
               or (self.spec.get("model") if isinstance(self.spec.get("model"), str) else None))
        if ref is None:
            return None
        from transformers import AutoTokenizer

        local = Path(str(ref)).expanduser()
        with quiet_transformers():
            try:
                source = str(local) if local.is_dir() else resolve_model_ref(ref)
                return AutoTokenizer.from_pretrained(source, **TOKENIZER_LOAD)
            except (OSError, ValueError, LookupError) as exc:
                if self.spec.get("tokenizer"):
                    raise ConfigError("task.tokenizer", ref, "a directory holding a Hugging Face tokenizer",
                                      str(exc)) from None
                return None  # a model directory without a tokenizer: the factory brings its own

    def _base_model(self) -> tuple[torch.nn.Module, list[str]]:
        spec = self.spec
        if spec.get("model_factory"):
            from lora_tune.tasks.python_factory import load_factory

            model = load_factory(spec["model_factory"])()
            if not isinstance(model, torch.nn.Module):
                raise ConfigError("task.model_factory", spec["model_factory"], "a function returning an nn.Module",
                                  f"it returned a {type(model).__name__}")
            return model, []
        import transformers

        classification = spec.get("model_class") == "sequence-classification"
        auto = transformers.AutoModelForSequenceClassification if classification else transformers.AutoModelForCausalLM
        extra = {"num_labels": spec["num_labels"]} if spec.get("num_labels") else {}
        dtype = DTYPES[spec.get("dtype") or "auto"]
        if isinstance(spec["model"], Mapping):
            config = dict(spec["model"]["config"])
            if self.tokenizer is not None:
                config.setdefault("vocab_size", len(self.tokenizer))
                if self.tokenizer.pad_token_id is not None:
                    config.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            kind = config.pop("model_type")
            with quiet_transformers(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(spec.get("seed") or 0))
                try:
                    model = auto.from_config(transformers.AutoConfig.for_model(kind, **config, **extra))
                except (TypeError, ValueError, KeyError) as exc:
                    raise ConfigError("task.model.config", dict(spec["model"]["config"]),
                                      "config keys transformers accepts for this model_type", str(exc)) from None
            return (model.to(dtype) if dtype is not None else model), []
        with quiet_transformers():
            model, info = auto.from_pretrained(resolve_model_ref(spec["model"]), **MODEL_LOAD,
                                               output_loading_info=True, dtype=dtype or "auto", **extra)
        return model, fresh_module_names(info.get("missing_keys", []))

    def build_model(self) -> torch.nn.Module:
        return self.template.fresh()

    def num_train_examples(self) -> int:
        return 0  # the factory's trainer owns the data

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "factory": self.spec["factory"], "injector": self.injector,
                "metrics": list(self.metrics)}

    # -- adapting ---------------------------------------------------------------------------------
    def adapt(self, model: torch.nn.Module, config: Any) -> tuple[torch.nn.Module, Any]:
        """Inject ``config`` with lora-tune's injector, or with PEFT (``injector: peft``)."""
        from lora_tune import inject

        with captured_library_output() as log:  # PEFT's warnings: kept with the trial's (train_adapted)
            adapted = (model, inject(model, config)) if self.injector == "lora-tune" else peft_adapt(model, config)
        self.adapt_log = log
        return adapted

    # -- training -----------------------------------------------------------------------------------
    def train_adapted(self, model: torch.nn.Module, config: Any, on_eval: Any, *, params: Mapping[str, Any],
                      explicit: Any) -> Any:
        """Build the user's trainer around ``model``, apply the study's settings, train, evaluate."""
        import transformers

        from lora_tune.train import build_optimizer
        from lora_tune.train.callbacks import metric_key
        from lora_tune.train.hf_callback import ReportingCallback

        reporter = ReportingCallback(self.default_metric, report=on_eval)
        start = time.perf_counter()
        with (tempfile.TemporaryDirectory(prefix="lora-tune-trainer-") as output_dir,
              captured_library_output() as log, _datasets_bars_off()):
            kwargs = dict(self.args, model=model, params=dict(params), callbacks=[reporter], output_dir=output_dir)
            if self.tokenizer is not None:
                kwargs["tokenizer"] = self.tokenizer
            trainer = self._make_trainer(model, kwargs)
            if reporter not in trainer.callback_handler.callbacks:
                trainer.add_callback(reporter)
            for printer in (transformers.trainer_callback.PrinterCallback,
                            transformers.trainer_callback.ProgressCallback):
                trainer.remove_callback(printer)  # the study's progress display reports instead
            # the study's settings, and no checkpoint of the whole model per trial: lora-tune keeps the adapter
            apply_training_arguments(trainer, {**training_overrides(config, explicit), **trial_outputs(output_dir)})
            if config.loraplus_lr_ratio is not None:
                trainer.optimizer = build_optimizer(trainer.model, config)
            trainer.train()
            final: dict[str, float] = {}
            if not reporter.pruned:  # the trial's value: a final evaluation of the trained model
                returned = trainer.evaluate()
                final = {k: float(v) for k, v in returned.items() if isinstance(v, (int, float))}
                final[self.default_metric] = final[metric_key(self.default_metric, final)]
        s = reporter.summary
        history = [{"step": e.step, "eval_index": e.eval_index, self.default_metric: e.value}
                   for e in reporter.pruning.evaluations]
        return dataclasses.replace(  # the callback's summary is a TrainResult: only what the trainer adds
            s, seconds=time.perf_counter() - start, history=history, final_metrics=final,
            stopped_early=reporter.pruned, log=list(dict.fromkeys(self.adapt_log + log)),
            effective_batch_size=trainer.args.train_batch_size * trainer.args.gradient_accumulation_steps)

    def _make_trainer(self, model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
        """``factory(**kwargs)``, checked: a ``transformers.Trainer`` around ``model`` as given (not
        another model, and not adapted again by PEFT: :class:`AdaptedAgainError`)."""
        import transformers

        ref = self.spec["factory"]
        try:
            trainer = self.factory(**kwargs)
        except Exception as exc:
            how = _adapting_again(exc)
            if how is not None:
                raise AdaptedAgainError(ref, how) from exc
            raise
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"{ref} returned a {type(trainer).__name__}, not a "
                            "transformers.Trainer (or a subclass such as trl.SFTTrainer)")
        if trainer.model is not model:
            if _is_peft_model(trainer.model):
                raise AdaptedAgainError(ref, "peft_model", type(trainer).__name__)
            if not any(m is model for m in trainer.model.modules()):
                raise TypeError(f"{ref} built its trainer around another model than the "
                                "one it was given; pass model=model to the Trainer")
        return trainer


def trial_outputs(output_dir: str) -> dict[str, Any]:
    """``TrainingArguments`` values for what a trial writes: nothing but into ``output_dir`` (a
    temporary directory lora-tune removes): no checkpoint (the base model's weights with every
    one), no best-model reload (the trial's value is the trained model's final evaluation), no
    upload. lora-tune stores the adapter of each new best trial itself."""
    from transformers.trainer_utils import SaveStrategy

    return {"output_dir": output_dir, "save_strategy": SaveStrategy.NO, "load_best_model_at_end": False,
            "push_to_hub": False}


class AdaptedAgainError(LoraTuneError):
    """The factory's trainer would adapt the model lora-tune adapted again (a ``peft_config``
    given to the trainer, or a PEFT model made of it): the message names the fix."""

    def __init__(self, factory: str, how: str, trainer: str = "trainer"):
        self.how = how
        if how == "peft_config":
            what = (f"the {trainer} was given peft_config; lora-tune adapts the model itself - remove "
                    f"peft_config=... from the {trainer}(...) call")
        else:
            what = (f"the {trainer}'s model is a PEFT model made of the model lora-tune adapted "
                    "(get_peft_model / PeftModel in the factory); lora-tune adapts the model itself - "
                    "pass the model it gives to the trainer as it is")
        super().__init__(f"task.factory ({factory}): {what} (the study's search_space sets rank, alpha, "
                         "targets and the other LoRA settings; task.injector: peft adapts with PEFT)")


def _adapting_again(exc: BaseException) -> str | None:
    """``"peft_config"`` when ``exc`` was raised while a ``transformers.Trainer`` was built with a
    ``peft_config`` (TRL's SFTTrainer wraps the model in ``get_peft_model`` in its ``__init__``),
    ``"peft_model"`` when it was raised inside PEFT's ``get_peft_model``; else None."""
    import traceback

    import transformers

    how = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        local = frame.f_locals
        if isinstance(local.get("self"), transformers.Trainer) and local.get("peft_config") is not None:
            return "peft_config"
        if frame.f_code.co_name == "get_peft_model" and str(frame.f_globals.get("__name__")).startswith("peft"):
            how = "peft_model"
    return how


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # without PEFT nothing could have wrapped it
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _datasets_bars_off() -> Iterator[None]:
    """No ``datasets`` progress bars (a factory's ``map``, TRL's tokenization) while the trial runs."""
    try:
        from datasets.utils import logging as ds_logging
    except ImportError:
        yield
        return
    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def peft_adapt(model: torch.nn.Module, config: Any) -> tuple[torch.nn.Module, Any]:
    """``peft.get_peft_model`` with ``config.to_peft(model)``, and lora-tune's report of it."""
    from peft import get_peft_model

    from lora_tune.lora.inject import InjectReport

    if config.quant_bits is not None:
        raise ConfigError("quant_bits", config.quant_bits, "null with injector: peft",
                          "PEFT quantizes the base when the model is loaded (BitsAndBytesConfig); "
                          "use injector: lora-tune to search quant_bits")
    total = sum(p.numel() for p in model.parameters())
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    peft_model = get_peft_model(model, config.to_peft(model))
    prefix = "base_model.model."  # PeftModel -> LoraModel -> the model: names as the model has them
    targets = [(name.removeprefix(prefix), type(m).__name__) for name, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    report = InjectReport(
        targets=targets, trainable_before=before,
        trainable_after=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_params=total, adapter_bytes=sum(p.numel() * p.element_size() for p in lora),
        preset=config.targets if isinstance(config.targets, str) else None)
    return peft_model, report


def build(spec: dict) -> TrainerTask:
    return TrainerTask(spec)


__all__ = ["TRAINING_ARGUMENTS", "AdaptedAgainError", "TrainerTask", "apply_training_arguments", "build", "peft_adapt",
           "training_overrides", "trial_outputs", "validate_spec"]

