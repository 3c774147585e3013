"""Report definitions: which panels, in what order, for single- and multi-objective studies.

``<kind>.yaml`` files, found first in ``$LORA_TUNE_DASHBOARDS``, then the checkout's ``dashboards/``,
then the installed package's ``lora_tune/dashboards/``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.errors import ConfigError, StudySpecError
from lora_tune.report.panels import PANELS

KINDS = ("single-objective", "multi-objective")
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PanelSpec:
    panel: str
    title: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportDefinition:
    kind: str
    title: str
    panels: list[PanelSpec]
    source: str


def search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("LORA_TUNE_DASHBOARDS")
    if env:
        dirs.append(Path(env))
    dirs.append(_PACKAGE_ROOT.parent / "dashboards")
    dirs.append(_PACKAGE_ROOT / "dashboards")
    return dirs


def find_definition(kind: str) -> Path:
    if kind not in KINDS:
        raise ConfigError("kind", kind, "one of " + ", ".join(KINDS))
    for folder in search_dirs():
        path = folder / f"{kind}.yaml"
        if path.is_file():
            return path
    raise ConfigError("report definition", kind, "a file " + f"{kind}.yaml in one of: "
                      + ", ".join(str(d) for d in search_dirs()))


def load_definition(source: str | Path) -> ReportDefinition:
    """Load a definition by kind (``single-objective``) or from a YAML file path."""
    path = find_definition(str(source)) if str(source) in KINDS else Path(source)
    from lora_tune.study.schema.yaml_file import load_yaml, read_spec_text  # bounded: size, file kind, aliases

    try:
        raw = load_yaml(read_spec_text(path), source=str(path))
    except StudySpecError as exc:
        where, why = exc.errors[0]
        raise ConfigError("definition", str(path), "a readable YAML file", f"{where}: {why}") from None
    return parse_definition(raw, str(path))


def parse_definition(raw: Any, source: str = "<definition>") -> ReportDefinition:
    """Validate a definition mapping; every error names its field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}", type(raw).__name__, "a mapping with keys kind, title, panels")
    unknown = sorted(set(raw) - {"kind", "title", "panels"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}", raw[unknown[0]], "keys kind, title, panels")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{source}: kind", kind, "one of " + ", ".join(KINDS))
    entries = raw.get("panels")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: panels", entries, "a non-empty list of panel names or mappings")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{source}: panels[{i}]"
        if isinstance(entry, str):
            entry = {"panel": entry}
        if not isinstance(entry, dict) or "panel" not in entry:
            raise ConfigError(where, entry, "a panel name or a mapping with a 'panel' key")
        name = entry["panel"]
        if name not in PANELS:
            raise ConfigError(f"{where}.panel", name, "one of " + ", ".join(PANELS))
        panel = PANELS[name]
        options = {k: v for k, v in entry.items() if k not in ("panel", "title")}
        bad = sorted(set(options) - set(panel.options))
        if bad:
            raise ConfigError(f"{where}.{bad[0]}", options[bad[0]],
                              f"options of panel {name!r}: " + (", ".join(panel.options) or "none"))
        title = entry.get("title", panel.title)
        if not isinstance(title, str):
            raise ConfigError(f"{where}.title", title, "a string")
        specs.append(PanelSpec(name, title, options))
    title = raw.get("title", "lora-tune study report")
    return ReportDefinition(kind, str(title), specs, source)


def definition_for(study: Any) -> ReportDefinition:
    """The definition that fits the study (by its number of objectives)."""
    return load_definition("multi-objective" if len(study.directions) > 1 else "single-objective")
