"""Export what a study found: ``best.yaml`` (read back by :func:`load_config`, so that
``inject(model, load_config("best.yaml"))`` rebuilds the trial's adapted model), the adapter,
and the trials as a table."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from lora_tune import __version__
from lora_tune.errors import ConfigError, StudySpecError
from lora_tune.lora.config import LoraConfig

BEST_FORMAT = 1
# trial params that describe the LoRA config (in the ``lora`` section); the rest are training settings
_LORA_PARAMS = {f.name for f in dataclasses.fields(LoraConfig)} | {"alpha_ratio"}


def load_config(path: str | os.PathLike) -> LoraConfig:
    """Read the ``lora`` section of an exported ``best.yaml`` as a ``LoraConfig``."""
    p = Path(path)
    from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text  # bounded: size, file kind, aliases

    try:
        raw = load_yaml(read_spec_text(p), source=str(p))
    except StudySpecError as exc:
        where, why = exc.errors[0]
        raise ConfigError("path", str(p), "a readable best.yaml written by `lora-tune export`",
                          f"{where}: {why}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("lora"), dict):
        raise ConfigError("lora", None if not isinstance(raw, dict) else raw.get("lora"),
                          f"a mapping of LoraConfig fields in {p}", "Write the file with `lora-tune export`.")
    return LoraConfig.from_dict(raw["lora"])


def exact_pattern(module_name: str) -> str:
    """A target pattern matching exactly one full module name (``re:`` + the escaped name)."""
    return "re:" + re.escape(module_name)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def choose_trial(study: Any, number: int | None = None) -> Any:
    """The trial to export: ``number`` when given (it must be complete), else the best one (with
    confirmation runs, the original trial of the config with the best mean)."""
    from optuna.trial import TrialState

    from lora_tune.report import frame

    complete = frame.complete_trials(study)
    if number is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == number:
                if t.state != TrialState.COMPLETE:
                    raise ConfigError("--trial", number, "a complete trial",
                                      f"Trial #{number} is {t.state.name.lower()}.")
                return t
        raise ConfigError("--trial", number, "a trial number of this study: "
                          + (", ".join(str(t.number) for t in complete) or "no complete trial yet"))
    if not complete:
        raise ConfigError("study", study.study_name, "a study with at least one complete trial",
                          f"It has {len(study.get_trials(deepcopy=False))} trial(s), none complete.")
    if frame.is_multi_objective(study):
        front = sorted(t.number for t in study.best_trials)
        raise ConfigError("--trial", None, "one of the Pareto-optimal trials: " + ", ".join(map(str, front)),
                          "A multi-objective study has no single best trial.")
    from lora_tune.study.trial.confirm import best_confirmed

    confirmed = best_confirmed(study)  # study.confirm: the config with the best mean over seeds
    return confirmed.trial if confirmed is not None else frame.best_trial(study)


def best_config_dict(study: Any, trial: Any, storage_url: str | None = None) -> dict[str, Any]:
    """The content of ``best.yaml`` for ``trial`` (a plain dict)."""
    import optuna

    from lora_tune.report import frame
    from lora_tune.study.trial import record
    attrs = trial.user_attrs
    lora = dict(attrs.get(record.LORA_CONFIG) or {})
    if not lora:
        raise ConfigError(record.LORA_CONFIG, None, "a trial that recorded its LoRA config (user attr lora_config)",
                          f"Trial #{trial.number} has none; was it run by lora-tune?")
    given = lora.get("targets")
    modules = attrs.get(record.TARGET_MODULES)
    if isinstance(modules, list) and modules:
        # a plain name also matches as a dotted suffix ("0" matches "1.0"): write exact matches
        lora["targets"] = [exact_pattern(m) for m in modules]
        lora["exclude"] = []  # the names are already resolved, exclusions applied
    LoraConfig.from_dict(lora)  # fail now, not when the user loads it
    spec = study.user_attrs.get("spec") or {}
    train = dict(spec.get("train") or {}) if isinstance(spec, dict) else {}
    train.update({k: v for k, v in trial.params.items() if k not in _LORA_PARAMS})
    names = frame.metric_names(study)
    from lora_tune.study.storage.opening import mask_url

    return {
        "format": BEST_FORMAT,
        "lora": lora,
        "targets": {"preset": attrs.get(record.TARGET_PRESET), "given": given, "modules": modules},
        "train": train,
        "task": spec.get("task") if isinstance(spec, dict) else None,
        "metric": {
            "name": names[0] if len(names) == 1 else names,
            "value": trial.values[0] if len(trial.values) == 1 else list(trial.values),
            "direction": [d.name.lower() for d in study.directions][0] if len(names) == 1
            else [d.name.lower() for d in study.directions],
            "all": attrs.get(record.METRIC_VALUES),
        },
        "trial": {
            "number": trial.number,
            "params": dict(trial.params),
            "trainable_params": attrs.get(record.TRAINABLE_PARAMS),
            "adapter_bytes": attrs.get(record.ADAPTER_BYTES),
            "is_baseline": record.kind_of(trial) == record.Kind.BASELINE,
        },
        "provenance": {
            "study": study.study_name,
            "trial": trial.number,
            "storage": mask_url(storage_url) if storage_url else None,
            "versions": {"lora_tune": __version__, "torch": _version("torch"), "optuna": optuna.__version__},
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def export_best(study: Any, output: str | os.PathLike, *, trial_number: int | None = None,
                storage_url: str | None = None, adapter_dir: str | os.PathLike | None = None,
                artifact_dir: str | os.PathLike | None = None,
                replaced: list[str] | None = None, serving: Any = None) -> dict[str, Any]:
    """Write ``best.yaml`` (and the adapter when ``adapter_dir`` is given); returns its content.

    ``serving`` (:class:`lora_tune.export_serving.ServingOptions`) adds the merged model, the GGUF
    adapter and the serve command (``content["serve"]``); a PiSSA adapter's ``peft/`` is converted
    to plain LoRA, and ``base_model_name_or_path`` is never an absolute path.
    Everything is staged beside its target first, then the adapter is renamed into place, then the
    merged model and the GGUF file, then the YAML, so a failure places nothing and the YAML never
    names an adapter that is not there. ``replaced`` collects ``"best.yaml"``, ``"adapter"``,
    ``"merged"`` and ``"gguf"`` for what was written over.
    """
    from lora_tune.export_serving import ServingOptions, stage_serving
    from lora_tune.safe_files import commit, output_file, stage_file
    from lora_tune.study.trial.artifacts import artifact_dir_for

    trial = choose_trial(study, trial_number)
    content = best_config_dict(study, trial, storage_url)
    out = output_file(output)
    staged = tmp = extra = None
    try:
        store_dir = artifact_dir_for(study, storage_url, artifact_dir)
        if adapter_dir is not None:
            from lora_tune.study.trial.artifacts import stage_adapter

            staged = stage_adapter(study, trial, adapter_dir, store_dir)
            content["adapter"] = {"path": str(Path(adapter_dir).resolve()), "formats": staged.formats}
        extra = stage_serving(study, trial, serving or ServingOptions(), store_dir=store_dir,
                              adapter_root=staged.staging if staged is not None else None, adapter_dir=adapter_dir)
        if staged is not None and "peft" in staged.formats and trial.user_attrs.get(
                "lora_config", {}).get("init") == "pissa":
            from lora_tune.export_serving import PISSA_NOTE

            content["adapter"]["peft"] = PISSA_NOTE
        content.update(extra.info)
        head = (f"# Best LoRA config of study {study.study_name!r}, trial #{trial.number}.\n"
                "# Rebuild: lora_tune.inject(model, lora_tune.load_config(\"" + Path(output).name + "\"))\n")
        text = head + yaml.safe_dump(content, sort_keys=False, allow_unicode=True)
        try:
            tmp = stage_file(out, text)
        except OSError as exc:
            raise ConfigError("output", str(output), "a path in an existing, writable directory",
                              exc.strerror or str(exc)) from None
        if staged is not None and staged.place() and replaced is not None:
            replaced.append("adapter")
        extra.place(replaced)
        try:
            existed = commit(tmp, out)
        except OSError as exc:
            raise ConfigError("output", str(output), "a writable file path", exc.strerror or str(exc)) from None
        if existed and replaced is not None:
            replaced.append("best.yaml")
    finally:
        if staged is not None:
            staged.discard()
        if extra is not None:
            extra.discard()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return content


def export_trials(study: Any, output: str | os.PathLike, replaced: list[str] | None = None) -> Path:
    """Write the trials table (no Optuna system attributes) as CSV or Parquet, by extension;
    returns the file written. ``replaced`` gets its name when it was written over."""
    from lora_tune.report import frame
    from lora_tune.safe_files import output_file, write_output

    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ConfigError("output", str(out), "a file name ending in .csv or .parquet")
    output_file(out)  # checked before the table is built
    if suffix == ".parquet":  # refused before the table is built
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("output", str(out),
                              "a .csv file, or install pyarrow (pip install 'lora-tune[parquet]')") from None
    df = frame.trials_dataframe(study, include_bulky=True)
    if suffix == ".csv":
        content: Any = df.to_csv(index=False)
    else:
        content = functools.partial(_parquet_safe(df).to_parquet, index=False)  # into the open file
    target, existed = write_output(out, content)
    if existed and replaced is not None:
        replaced.append(target.name)
    return target


def _parquet_safe(df: Any) -> Any:
    """Columns mixing kinds of values (e.g. a number in one trial, text in another) become text;
    Parquet columns have one type."""
    df = df.copy()
    for col in df.columns[df.dtypes == object]:  # noqa: E721 - pandas' elementwise dtype test, not a type check
        kinds = {type(v) for v in df[col] if v is not None and v == v}
        numeric = kinds <= {int, float} or kinds <= {bool}
        if len(kinds) > 1 and not numeric and not all(issubclass(k, datetime) for k in kinds):
            df[col] = df[col].map(lambda v: None if v is None or v != v else str(v))
    return df
