"""No import cycles among the modules that were once tangled: the two adapter formats, and the
storage layer with the workers on top of it (STYLE.md: shared pieces move to a module both
sides import). Imports inside functions count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(module: str) -> set[str]:
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _cycle(modules: list[str]) -> list[str] | None:
    graph = {m: sorted(_imports(m) & set(modules) - {m}) for m in modules}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state and (found := visit(n, path + [m])):
                return found
        state[m] = 2
        return None

    for m in modules:
        if m not in state and (found := visit(m, [])):
            return found
    return None


STORAGE = ["lora_tune.study.storage", "lora_tune.study.storage_proxy", "lora_tune.study.workers",
           "lora_tune.study.heartbeat", "lora_tune.study.samplers", "lora_tune.study._optuna_private",
           *sorted(f"lora_tune.study.storages.{p.stem}" for p in (ROOT / "lora_tune/study/storages").glob("*.py")
                   if p.stem != "__init__")]
ADAPTERS = ["lora_tune.lora.state", "lora_tune.lora.peft_format", "lora_tune.lora.adapter_sites"]


@pytest.mark.parametrize("modules", [STORAGE, ADAPTERS], ids=["storage", "adapter-formats"])
def test_no_import_cycle(modules):
    assert _cycle(modules) is None, " -> ".join(_cycle(modules))
