"""No import cycles (STYLE.md: shared pieces move to a module both sides import; a value object
does not import its translators), imports inside functions included, among every module of
lora_tune found on disk (so a new module is checked too); no module name used twice; the study
layers import one way. PEFT interop is a leaf of lora/."""
from __future__ import annotations

import ast
from pathlib import Path


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


PACKAGE = _modules("lora_tune")
LORA = _modules("lora_tune.lora")


def test_no_import_cycle_in_the_whole_package():
    """Every module of lora_tune found on disk: a new module is checked without being listed."""
    assert _cycle(_graph(PACKAGE)) is None, " -> ".join(_cycle(_graph(PACKAGE)))


def test_no_module_name_is_used_twice():
    """A module's name says which one it is: none repeats in another package."""
    names: dict[str, list[str]] = {}
    for module in PACKAGE:
        if _path(module).name != "__init__.py":
            names.setdefault(module.rpartition(".")[2], []).append(module)
    assert {n: ms for n, ms in names.items() if len(ms) > 1} == {}


def test_the_study_layers_import_one_way():
    """Inside study/: schema -> trial -> run, storage beside them; integrations and run above trial."""
    order = ["schema", "trial", "run"]
    graph = _graph(PACKAGE)
    wrong = []
    for module, deps in graph.items():
        layer = module.split(".")[2] if module.startswith("lora_tune.study.") else None
        for dep in deps:
            other = dep.split(".")[2] if dep.startswith("lora_tune.study.") else None
            if layer in order and other in order and order.index(other) > order.index(layer):
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


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
