"""No import cycles (STYLE.md: shared pieces move to a module both sides import; a value object
does not import its translators), imports inside functions included: among every module of the
core injector lora_tune/lora/ (found on disk, so a new module is checked too), and among the
storage layer with the workers on top of it. PEFT interop is a leaf of lora/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _path(module: str) -> Path:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in it (functions too; relative imports resolved)."""
    path = _path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _modules(package: str) -> list[str]:
    """Every module of ``package``, its own and its subpackages' ``__init__`` included."""
    out = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def _graph(modules: list[str]) -> dict[str, list[str]]:
    return {m: sorted(_imports(m) & set(modules) - {m}) for m in modules}


def _cycle(graph: dict[str, list[str]]) -> list[str] | None:
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

    for m in graph:
        if m not in state and (found := visit(m, [])):
            return found
    return None


STORAGE = ["lora_tune.study.storage", "lora_tune.study.storage_proxy", "lora_tune.study.workers",
           "lora_tune.study.heartbeat", "lora_tune.study.samplers", "lora_tune.study._optuna_private",
           *sorted(f"lora_tune.study.storages.{p.stem}" for p in (ROOT / "lora_tune/study/storages").glob("*.py")
                   if p.stem != "__init__")]
LORA = _modules("lora_tune.lora")


@pytest.mark.parametrize("modules", [STORAGE, LORA], ids=["storage", "lora"])
def test_no_import_cycle(modules):
    assert _cycle(_graph(modules)) is None, " -> ".join(_cycle(_graph(modules)))


def test_the_lora_walk_sees_every_module_and_every_import():
    assert {"lora_tune.lora", "lora_tune.lora.config", "lora_tune.lora.inject", "lora_tune.lora.state",
            "lora_tune.lora.peft", "lora_tune.lora.peft.translate", "lora_tune.lora.peft.adapter_format"} <= set(LORA)
    graph = _graph(LORA)
    assert "lora_tune.lora.peft.adapter_format" in graph["lora_tune.lora.state"]        # module level
    assert "lora_tune.lora.peft" in graph["lora_tune.lora"]                             # inside a function
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_peft_interop_is_a_leaf():
    """Only the adapter IO (which dispatches format="peft") and the LoraConfig.to_peft / from_peft
    aliases reach into lora_tune.lora.peft; the config imports none of its translators."""
    graph = _graph(LORA)
    users = sorted(m for m, deps in graph.items() if not m.startswith("lora_tune.lora.peft")
                   and any(d == "lora_tune.lora.peft" or d.startswith("lora_tune.lora.peft.") for d in deps))
    assert users == ["lora_tune.lora", "lora_tune.lora.state"]
