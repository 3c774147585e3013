"""Adapter weights of the best trials (lora-tune and PEFT formats, zipped) as Optuna artifacts in
a ``FileSystemArtifactStore``, whose directory is recorded as the study attribute ``artifact_dir``."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta, upload_artifact
from optuna.trial import FrozenTrial, TrialState

from lora_tune.errors import AdapterFormatError, ConfigError
from lora_tune.study import _optuna_private as private
from lora_tune.study.trial import record
from lora_tune.safe_files import output_dir

# optuna.artifacts keeps the ImportError of boto3 / google.api_core with the frames that imported
# it, whoever that was (often a function holding a task and its model): let those frames go.
private.drop_import_tracebacks()

ENV_ARTIFACTS = "LORA_TUNE_ARTIFACTS"
ARTIFACT_DIRNAME = "lora_tune_artifacts"
ADAPTER_PREFIX = "adapter-trial-"
FORMATS = ("lora-tune", "peft")


def default_artifact_dir(storage_url: str | None) -> Path:
    """``$LORA_TUNE_ARTIFACTS``, else ``lora_tune_artifacts`` beside an SQLite or journal file, else
    in the working directory."""
    env = os.environ.get(ENV_ARTIFACTS)
    if env:
        return Path(env).expanduser().resolve()
    if storage_url:
        from lora_tune.study.storage.opening import journal_path, storage_kind

        kind = storage_kind(storage_url)
        if kind == "journal":
            return Path(journal_path(storage_url)).resolve().parent / ARTIFACT_DIRNAME
        if kind == "sqlite":
            from sqlalchemy.engine import make_url

            database = make_url(storage_url).database
            if database:
                return Path(database).resolve().parent / ARTIFACT_DIRNAME
    return Path.cwd().resolve() / ARTIFACT_DIRNAME


def artifact_dir_for(study: optuna.Study, storage_url: str | None = None,
                     artifact_dir: str | os.PathLike | None = None) -> Path:
    """The artifact directory to use: explicit, else recorded in the study, else the default."""
    if artifact_dir is not None:
        return Path(artifact_dir).expanduser().resolve()
    recorded = study.user_attrs.get("artifact_dir")
    if isinstance(recorded, str) and Path(recorded).is_dir() and not os.environ.get(ENV_ARTIFACTS):
        return Path(recorded)
    return default_artifact_dir(storage_url)


def open_artifact_store(directory: str | os.PathLike) -> FileSystemArtifactStore:
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("artifact_dir", str(path), "a creatable, writable directory", exc.strerror) from None
    return FileSystemArtifactStore(str(path))


def is_best_so_far(study: optuna.Study, value: float | Sequence[float], exclude_number: int | None = None) -> bool:
    """Whether no complete trial is :func:`beaten_by` ``value``'s equal or better."""
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != len(study.directions):
        raise ConfigError("value", value, f"{len(study.directions)} objective value(s)")
    return not any(beaten_by(study, values, t.values) for t in study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE,)) if t.number != exclude_number and t.values is not None)


def beaten_by(study: optuna.Study, mine: Sequence[float], other: Sequence[float]) -> bool:
    """Whether ``other`` is at least as good as ``mine`` (one objective) or dominates it (several)."""
    signs = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]
    m, o = [s * v for s, v in zip(signs, mine)], [s * v for s, v in zip(signs, other)]
    if len(m) == 1:
        return o[0] >= m[0]
    return all(a >= b for a, b in zip(o, m)) and any(a > b for a, b in zip(o, m))


def save_best_adapter(
    trial: optuna.Trial | FrozenTrial,
    model: Any,
    value: float | Sequence[float],
    *,
    config: Any = None,
    storage_url: str | None = None,
    artifact_dir: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
    force: bool = False,
    archive: str | os.PathLike | None = None,
    attach_to: optuna.Trial | None = None,
) -> str | None:
    """Save ``model``'s adapter as an artifact of ``trial`` when it is the best so far (or ``force``);
    the artifact id, or None.

    ``archive``: one already written (by a trial's child process) to upload instead of ``model``'s.
    ``attach_to``: the running trial that stores it when ``trial`` is a finished one (a nested
    rank's result is stored on its parent; the file name says whose it is).
    """
    study = (attach_to or trial).study
    if not force and not is_best_so_far(study, value, exclude_number=trial.number):
        return None
    directory = artifact_dir_for(study, storage_url, artifact_dir)
    store = open_artifact_store(directory)
    with tempfile.TemporaryDirectory(prefix="lora-tune-adapter-") as tmp:
        path = Path(tmp) / f"{ADAPTER_PREFIX}{trial.number}.zip"
        if archive is not None:
            shutil.copyfile(archive, path)
        else:
            write_adapter_archive(model, path, config=config, base_model_name_or_path=base_model_name_or_path)
        artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=attach_to or trial)
    if study.user_attrs.get("artifact_dir") != str(directory):
        study.set_user_attr("artifact_dir", str(directory))
    return artifact_id


def write_adapter_archive(model: Any, archive: Path, *, config: Any = None,
                          base_model_name_or_path: str | None = None) -> list[str]:
    """Zip the adapter in both formats (``lora-tune/`` and ``peft/``); returns the formats written
    (why PEFT's could not be written is kept in ``manifest.json``)."""
    from lora_tune import save_adapter

    manifest: dict[str, Any] = {"formats": [], "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="lora-tune-formats-") as tmp:
        root = Path(tmp)
        if hasattr(model, "peft_config"):  # adapted by PEFT itself (the trainer task's injector: peft)
            model.save_pretrained(str(root / "peft"))
            manifest["formats"].append("peft")
            manifest["skipped"]["lora-tune"] = "the model was adapted by PEFT (injector: peft)"
        for fmt in () if hasattr(model, "peft_config") else FORMATS:
            try:
                extra = {"base_model_name_or_path": base_model_name_or_path} if fmt == "peft" else {}
                save_adapter(model, root / fmt, format=fmt, config=config, **extra)
                manifest["formats"].append(fmt)
            except AdapterFormatError as exc:
                if fmt == "lora-tune":
                    raise
                manifest["skipped"][fmt] = str(exc)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(root).as_posix())
    return manifest["formats"]


def adapter_artifacts(study: optuna.Study, trial: FrozenTrial) -> list[Any]:
    """Artifact metadata of the adapter archives saved for ``trial`` (a nested rank's result keeps
    them on its parent trial, user attribute ``nested_parent``)."""
    owner = trial
    parent = trial.user_attrs.get(record.NESTED_PARENT)
    if parent is not None:
        owner = next((t for t in study.get_trials(deepcopy=False) if t.number == parent), trial)
    name = f"{ADAPTER_PREFIX}{trial.number}.zip"
    return [m for m in get_all_artifact_meta(owner, storage=private.study_storage(study)) if m.filename == name]


def trials_with_adapters(study: optuna.Study) -> list[int]:
    return [t.number for t in study.get_trials(deepcopy=False) if adapter_artifacts(study, t)]


def extract_adapter(study: optuna.Study, trial: FrozenTrial, dest: str | os.PathLike,
                    artifact_dir: str | os.PathLike) -> list[str]:
    """Write the trial's adapter to ``dest`` (``dest/lora-tune``, ``dest/peft``), whole or not at
    all; returns the formats."""
    staged = stage_adapter(study, trial, dest, artifact_dir)
    try:
        staged.place()
    finally:
        staged.discard()
    return staged.formats


@dataclass
class StagedAdapter:
    """A trial's adapter extracted into ``staging``, a hidden folder beside ``dest``, waiting to be
    renamed into place by :meth:`place`; :meth:`discard` removes what was not placed."""

    dest: Path
    staging: Path
    formats: list[str]
    replaces: bool  # dest holds an adapter written earlier, which place() replaces

    def place(self) -> bool:
        """Rename the adapter into place; returns whether an earlier adapter was replaced."""
        from lora_tune.safe_files import place_dir

        try:
            return place_dir(self.staging, self.dest, replace=self.replaces)
        except OSError as exc:
            raise ConfigError("--adapter", str(self.dest), _DEST_ALLOWED, exc.strerror or str(exc)) from None

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


_DEST_ALLOWED = "a new or empty directory, or an adapter folder written by `lora-tune export`"
_EXPORTED = {"manifest.json", *FORMATS}  # what an exported adapter folder holds


def check_adapter_dest(dest: str | os.PathLike) -> bool:
    """Refuse an ``--adapter`` path that cannot take the adapter; whether it holds an adapter
    exported earlier, to be replaced."""
    return output_dir(dest, "--adapter", _DEST_ALLOWED, _is_exported_adapter)


def _is_exported_adapter(path: Path, entries: list[Path]) -> bool:
    """Whether a folder holds what ``lora-tune export --adapter`` writes, and nothing else."""
    names = {p.name for p in entries}
    manifest = path / "manifest.json"
    if not names <= _EXPORTED or "manifest.json" not in names or manifest.is_symlink() or not manifest.is_file():
        return False
    if any(p.is_symlink() or not p.is_dir() for p in entries if p.name != "manifest.json"):
        return False
    try:
        return isinstance(json.loads(manifest.read_text(encoding="utf-8")).get("formats"), list)
    except (OSError, ValueError, AttributeError):
        return False


def stage_adapter(study: optuna.Study, trial: FrozenTrial, dest: str | os.PathLike,
                  artifact_dir: str | os.PathLike) -> StagedAdapter:
    """Extract the trial's adapter into a hidden folder beside ``dest`` (checked first with
    :func:`check_adapter_dest`; its parents are created). The caller places or discards it."""
    from lora_tune.safe_files import stage_dir

    dest = Path(dest)
    replaces = check_adapter_dest(dest)
    metas = adapter_artifacts(study, trial)
    if not metas:
        with_adapters = trials_with_adapters(study)
        raise ConfigError("--trial", trial.number, "a trial with a saved adapter: "
                          + (", ".join(f"#{n}" for n in with_adapters) or "none in this study"),
                          "Adapters are saved for trials that were the best so far when they finished.")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = stage_dir(dest)
    except OSError as exc:
        raise ConfigError("--adapter", str(dest), "a writable directory path", exc.strerror) from None
    store = FileSystemArtifactStore(str(artifact_dir))
    try:
        archive = staging / "adapter.zip"
        try:
            download_artifact(artifact_store=store, file_path=str(archive), artifact_id=metas[-1].artifact_id)
        except (FileNotFoundError, optuna.artifacts.exceptions.ArtifactNotFound) as exc:
            raise ConfigError("--artifact-dir", str(artifact_dir), "the artifact directory of this study",
                              f"Adapter of trial #{trial.number} not found there ({exc}).") from None
        try:
            with zipfile.ZipFile(archive) as zf:
                _safe_extract(zf, staging)
            archive.unlink()
            formats = list(json.loads((staging / "manifest.json").read_text(encoding="utf-8"))["formats"])
        except AdapterFormatError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, FileNotFoundError, ValueError, KeyError, TypeError) as exc:
            raise AdapterFormatError(f"the adapter archive of trial #{trial.number} in {artifact_dir} is damaged "
                                     f"({type(exc).__name__}: {exc})") from None
        except OSError as exc:
            raise ConfigError("--adapter", str(dest), "a writable directory path", exc.strerror or str(exc)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StagedAdapter(dest, staging, formats, replaces)


def _safe_extract(zf: zipfile.ZipFile, root: Path) -> None:
    base = root.resolve()
    for name in zf.namelist():
        target = (root / name).resolve()
        if base not in target.parents:
            raise AdapterFormatError(f"adapter archive entry {name!r} points outside the target folder")
    zf.extractall(root)
