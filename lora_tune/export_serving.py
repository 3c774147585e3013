"""The serving side of ``lora-tune export``: ``--merged DIR``, ``--gguf FILE``, PiSSA's conversion to
plain LoRA, ``base_model_name_or_path``, and the serve command with the engine's warnings
(:mod:`lora_tune.serving`'s rules).

:func:`stage_serving` does the work beside the targets (staged folders and files, nothing in
place); :meth:`StagedServing.place` renames them into place, after the adapter and before
best.yaml (:func:`lora_tune.export.export_best`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.errors import ConfigError

ENGINES = ("vllm", "sglang", "llama.cpp")
DEFAULT_ENGINE = "vllm"
PISSA_NOTE = ("PiSSA adapter converted to plain LoRA of rank 2r over the unmodified base "
              "(s·[B, -B0] [A; A0]; lora-tune/ keeps it as trained)")


@dataclass
class ServingOptions:
    """What ``lora-tune export`` was asked for beyond best.yaml and the adapter."""

    merged_dir: str | os.PathLike | None = None
    gguf_file: str | os.PathLike | None = None
    engine: str | None = None            # None: the study's study.serve.engine, else vLLM
    allow_code: Sequence[str] = ()
    study_file: str | os.PathLike | None = None


@dataclass
class StagedServing:
    """The merged model and the GGUF file staged beside their targets; ``info``: the sections
    best.yaml gets (``merged``, ``gguf``, ``serve``)."""

    info: dict[str, Any] = field(default_factory=dict)
    merged: tuple[Path, Path, bool] | None = None  # (staging folder, target, replaces an earlier export's)
    gguf: tuple[Path, Path] | None = None          # (staged file, target)

    def place(self, replaced: list[str] | None = None) -> None:
        """Rename the merged model, then the GGUF file, into place."""
        from lora_tune.safe_files import commit, place_dir

        if self.merged is not None:
            staging, target, replaces = self.merged
            try:
                if place_dir(staging, target, replace=replaces) and replaced is not None:
                    replaced.append("merged")
            except OSError as exc:
                raise ConfigError("--merged", str(target), "a writable directory path",
                                  exc.strerror or str(exc)) from None
            self.merged = None
        if self.gguf is not None:
            tmp, target = self.gguf
            try:
                if commit(tmp, target) and replaced is not None:
                    replaced.append("gguf")
            except OSError as exc:
                raise ConfigError("--gguf", str(target), "a writable file path", exc.strerror or str(exc)) from None
            self.gguf = None

    def discard(self) -> None:
        if self.merged is not None:
            shutil.rmtree(self.merged[0], ignore_errors=True)
        if self.gguf is not None:
            self.gguf[0].unlink(missing_ok=True)


def _task_spec(study: Any) -> dict[str, Any]:
    spec = study.user_attrs.get("spec")
    task = spec.get("task") if isinstance(spec, dict) else None
    return dict(task) if isinstance(task, dict) else {}


def _stored_serve(study: Any) -> dict[str, Any]:
    spec = study.user_attrs.get("spec")
    section = spec.get("study") if isinstance(spec, dict) else None
    serve = section.get("serve") if isinstance(section, dict) else None
    return dict(serve) if isinstance(serve, dict) else {}


def _manifest(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"formats": [], "skipped": {}}


def _require_format(manifest: Mapping[str, Any], fmt: str, option: str, trial: Any) -> None:
    if fmt in (manifest.get("formats") or []):
        return
    why = (manifest.get("skipped") or {}).get(fmt) or "not in the stored adapter"
    raise ConfigError(option, f"trial #{trial.number}", f"a trial whose stored adapter has the {fmt} format",
                      f"Its adapter was stored without it: {why}.")


@contextlib.contextmanager
def _adapter_source(study: Any, trial: Any, staged_root: Path | None, store_dir: Path) -> Iterator[Path]:
    """The folder holding the trial's adapter (lora-tune/, peft/, manifest.json): the one staged
    for ``--adapter``, or one extracted into a temporary folder."""
    if staged_root is not None:
        yield staged_root
        return
    from lora_tune.study.trial.artifacts import stage_adapter

    with tempfile.TemporaryDirectory(prefix="lora-tune-export-") as tmp:
        staged = stage_adapter(study, trial, Path(tmp) / "adapter", store_dir)
        try:
            yield staged.staging
        finally:
            staged.discard()


def stage_serving(study: Any, trial: Any, options: ServingOptions, *, store_dir: Path,
                  adapter_root: Path | None, adapter_dir: str | os.PathLike | None) -> StagedServing:
    """Check the targets, then stage the merged model and the GGUF file, convert a PiSSA adapter's
    peft/ folder in ``adapter_root`` (the ``--adapter`` staging) and write its
    ``base_model_name_or_path``; the serve command and warnings go into ``info["serve"]``."""
    from lora_tune.export_model import check_merged_dest
    from lora_tune.safe_files import output_file

    out = StagedServing()
    engine = options.engine
    if engine is not None and engine not in ENGINES:
        raise ConfigError("--engine", engine, ", ".join(ENGINES))
    merged_replaces = check_merged_dest(options.merged_dir) if options.merged_dir is not None else False
    gguf_target = output_file(options.gguf_file, "--gguf") if options.gguf_file is not None else None
    lora_config = dict(trial.user_attrs.get("lora_config") or {})
    pissa = lora_config.get("init") == "pissa"
    with_peft = adapter_root is not None and "peft" in (_manifest(adapter_root).get("formats") or [])
    convert = pissa and (with_peft or gguf_target is not None)  # the peft/ folder served over the base
    task_spec = _task_spec(study)
    try:
        if options.merged_dir is not None or gguf_target is not None or convert:
            with _adapter_source(study, trial, adapter_root, store_dir) as root:
                _stage_outputs(study, trial, options, out, root, convert, merged_replaces, gguf_target, lora_config)
        if adapter_root is not None and adapter_dir is not None:
            _name_base_model(adapter_root, task_spec, Path(adapter_dir) / "peft")
    except BaseException:
        out.discard()
        raise
    served = _served_config(lora_config, pissa)
    out.info["serve"] = serve_section(study, served, engine, task_spec, adapter_dir, options.gguf_file,
                                      options.merged_dir, out.info.get("merged", {}).get("auto_class"))
    return out


def _stage_outputs(study: Any, trial: Any, options: ServingOptions, out: StagedServing, root: Path, convert: bool,
                   merged_replaces: bool, gguf_target: Path | None, lora_config: Mapping[str, Any]) -> None:
    from lora_tune.export_gguf import architecture, gguf_pairs, peft_scales, served_alpha, write_gguf
    from lora_tune.export_model import (auto_class_name, merged_model, pissa_to_plain, rebuilt_trial,
                                        require_hf_model, save_merged, task_tokenizer, trial_task)
    from lora_tune.safe_files import stage_dir, stage_file

    manifest = _manifest(root)
    task, task_spec = trial_task(study, options.allow_code, options.study_file)
    if options.merged_dir is not None:
        require_hf_model(task, "--merged")
        _require_format(manifest, "lora-tune", "--merged", trial)
    structure = None
    if gguf_target is not None:
        structure = require_hf_model(task, "--gguf")
        architecture(structure.config)  # an architecture gguf maps, before anything heavy
        _require_format(manifest, "peft", "--gguf", trial)
    if convert:
        _require_format(manifest, "lora-tune", "--adapter" if gguf_target is None else "--gguf", trial)
    if options.merged_dir is not None or convert:
        with rebuilt_trial(task, root / "lora-tune") as rebuilt:
            if convert:
                assert rebuilt.initial is not None
                pissa_to_plain(root / "peft", rebuilt.initial)
                manifest.setdefault("converted", {})["peft"] = PISSA_NOTE
                (root / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            if options.merged_dir is not None:
                target = Path(options.merged_dir)
                model = merged_model(rebuilt.model)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    staging = stage_dir(target)
                except OSError as exc:
                    raise ConfigError("--merged", str(target), "a writable directory path",
                                      exc.strerror or str(exc)) from None
                out.merged = (staging, target, merged_replaces)
                dtype = str(next(model.parameters()).dtype).replace("torch.", "")
                auto = auto_class_name(model)
                save_merged(model, task_tokenizer(task, task_spec), staging, {
                    "study": study.study_name, "trial": trial.number, "auto_class": auto, "dtype": dtype,
                    "pissa": bool(rebuilt.initial is not None)})
                out.info["merged"] = {"path": str(target.resolve()), "auto_class": auto, "dtype": dtype}
    if gguf_target is not None:
        assert structure is not None
        meta = json.loads((root / "peft" / "adapter_config.json").read_text(encoding="utf-8"))
        alpha = served_alpha(lora_config, 2 if convert else 1)
        pairs = gguf_pairs(root / "peft", peft_scales(root / "peft"), structure.config, alpha)
        try:
            tmp = stage_file(gguf_target, b"")
        except OSError as exc:
            raise ConfigError("--gguf", str(options.gguf_file), "a path in an existing, writable directory",
                              exc.strerror or str(exc)) from None
        out.gguf = (tmp, gguf_target)
        write_gguf(tmp, pairs, structure.config, alpha, f"{study.study_name} trial {trial.number}")
        out.info["gguf"] = {"path": str(gguf_target), "alpha": alpha, "tensors": 2 * len(pairs),
                            "rank": int(meta.get("r", 0))}


def _name_base_model(root: Path, task_spec: Mapping[str, Any], final_peft: Path) -> None:
    """adapter_config.json's ``base_model_name_or_path``: the model's name or a relative path."""
    from lora_tune.export_model import base_model_reference, set_base_model

    config = root / "peft" / "adapter_config.json"
    if not config.is_file():
        return
    model = task_spec.get("model")
    if isinstance(model, Mapping):
        reference = None  # a model built from a config has no name
    else:
        if not isinstance(model, str):  # e.g. a factory's model: what its config said
            model = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        reference = base_model_reference({"model": model}, final_peft)
    set_base_model(root / "peft", reference)


def _served_config(lora_config: Mapping[str, Any], pissa: bool) -> dict[str, Any]:
    from lora_tune.export_model import served_config

    return served_config(lora_config, pissa) if lora_config else {}


def _served_rank(config: Mapping[str, Any]) -> int:
    ranks = [int(config.get("rank") or 0)] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks) or 1


def serve_section(study: Any, served: Mapping[str, Any], engine: str | None, task_spec: Mapping[str, Any],
                  adapter_dir: str | os.PathLike | None, gguf_file: str | os.PathLike | None,
                  merged_dir: str | os.PathLike | None, auto_class: str | None) -> dict[str, Any]:
    """``{"engine", "command", "merged_command", "warnings"}``: how to serve the export, and what
    the engine cannot load (:func:`lora_tune.serving.unservable`)."""
    stored = _stored_serve(study)
    if engine is None:
        engine = stored.get("engine") if stored.get("engine") in ENGINES else DEFAULT_ENGINE
    max_rank = stored.get("max_lora_rank") if stored.get("engine") == engine else None
    section: dict[str, Any] = {"engine": engine, "command": None, "warnings": []}
    try:
        from lora_tune.serving import serve_command, unservable
    except ImportError:  # pragma: no cover - the rules module ships with lora-tune
        section["warnings"].append("lora_tune.serving is missing: no serve command")
        return section
    model = task_spec.get("model")
    base = model if isinstance(model, str) else "BASE_MODEL"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", study.study_name) or "adapter"
    if engine == "llama.cpp":
        adapter = str(gguf_file) if gguf_file is not None else "ADAPTER.gguf"
        if gguf_file is None:
            section["warnings"].append("llama.cpp loads GGUF adapters: add --gguf FILE to write one")
    else:
        adapter = str(Path(adapter_dir) / "peft") if adapter_dir is not None else "ADAPTER_DIR/peft"
        if adapter_dir is None:
            section["warnings"].append(f"{engine} loads the PEFT adapter: add --adapter DIR to write it")
    section["warnings"] += unservable(served, engine, max_rank) if served else []
    section["command"] = serve_command(engine, adapter, base, _served_rank(served) if served else 1, name)
    if merged_dir is not None and auto_class == "AutoModelForCausalLM":
        section["merged_command"] = merged_command(engine, str(merged_dir))
    return section


def merged_command(engine: str, merged_dir: str) -> str:
    """The command that serves a merged model folder."""
    import shlex

    q = shlex.quote(merged_dir)
    if engine == "sglang":
        return f"python -m sglang.launch_server --model-path {q}"
    if engine == "llama.cpp":
        gguf = shlex.quote(f"{Path(merged_dir).name or 'merged'}.gguf")
        return f"python convert_hf_to_gguf.py {q} --outfile {gguf} && llama-server -m {gguf}"
    return f"vllm serve {q}"
