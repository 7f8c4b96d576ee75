"""The package's modules import one another in one direction: no import cycle, imports inside functions included
(an import moved into a function still makes a cycle, only a hidden one)."""

import ast
import shutil
from pathlib import Path

import lora_cli

PACKAGE_DIR = Path(lora_cli.__file__).parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root (a package's __init__ under the package's name)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement brings in, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    prefix = (base + "." + node.module if node.module else base) if node.level else node.module
    return [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file. Importing a.b.c runs a and a.b first, so
    the packages above an imported module count as imported too."""
    modules = module_names(root, package)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, name, path.name == "__init__.py"):
                    parts = target.split(".")
                    edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        edges.discard(name)
        # A module's own packages run before it and are no cycle of its making.
        graph[name] = {edge for edge in edges if not name.startswith(edge + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR, "lora_cli")
    assert len(graph) > 20 and "lora_cli.speed.wiring" in graph  # every subfolder is read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_levers_never_import_the_trainer_facing_modules():
    graph = import_graph(PACKAGE_DIR, "lora_cli")
    facing = {"lora_cli.speed.policy", "lora_cli.speed.wiring"}
    levers = [name for name in graph if name.startswith("lora_cli.speed.") and name not in facing]
    assert levers
    for lever in levers:
        assert not graph[lever] & facing, f"{lever} imports {graph[lever] & facing}"


def test_a_cycle_added_back_is_found(tmp_path):
    """The check itself: the memory model importing training again, inside a function, is a cycle."""
    copy = tmp_path / "lora_cli"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    memory = copy / "memory" / "plan.py"
    memory.write_text(memory.read_text(encoding="utf-8") + "\n\ndef _plan_of_a_run():\n"
                      "    from lora_cli.train import train\n", encoding="utf-8")
    cycle = find_cycle(import_graph(copy, "lora_cli"))
    assert cycle is not None and cycle[0] == cycle[-1] and "lora_cli.memory.plan" in cycle and "lora_cli.train" in cycle
