"""rr's import graph, read from the source: no cycle (imports inside functions count), a leaf layer (rr.core)
that imports nothing above it, no private name imported across modules, and light imports for config and deploy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rr"
LEAF_ALLOWED = ("rr.core", "rr.errors")  # rr.core may import only these


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `if TYPE_CHECKING:`: never run, so not an import at run time."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return True
    return False


def imports_of(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """(imported rr module, imported name or None, line) for every run-time import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "rr"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "rr":
                found += [(source, a.name, node.lineno) for a in node.names]
    return found


def resolve(source: str, imported: str | None) -> str:
    """The rr module an import loads: `from rr.a import b` is module rr.a.b when that exists, else rr.a."""
    target = f"{source}.{imported}" if imported and f"{source}.{imported}" in MODULES else source
    while target not in MODULES and "." in target:
        target = target.rpartition(".")[0]
    return target


def graph() -> dict[str, set[str]]:
    edges = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for source, imported, _ in imports_of(path, name):
            target = resolve(source, imported)
            if target != name:
                edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_imports_inside_functions_and_skips_type_checking_ones(tmp_path):
    assert cycles({"rr.a": {"rr.b"}, "rr.b": {"rr.c"}, "rr.c": {"rr.a"}, "rr.d": {"rr.a"}}) == [["rr.a", "rr.b", "rr.c"]]
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rr.job import Job\n"
                     "def f():\n    from rr.config import JobConfig\n")
    assert imports_of(probe, "rr.probe") == [("rr.config", "JobConfig", 5)]


def test_rr_has_no_import_cycle():
    assert cycles(graph()) == [], "import cycles among rr modules (break them by moving the shared part to rr.core)"


def test_the_leaf_layer_imports_nothing_above_it():
    offenders = [(name, target) for name, targets in graph().items() if name.startswith("rr.core")
                 for target in targets if not target.startswith(LEAF_ALLOWED)]
    assert offenders == []


def test_no_private_name_is_imported_from_another_module():
    sources = {**MODULES, **{f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")}}
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {imported} from {source}"
                 for name, path in sources.items() for source, imported, line in imports_of(path, name)
                 if imported and imported.startswith("_") and not imported.startswith("__")]
    assert offenders == []


def test_config_and_deploy_import_without_torch():
    # `rr submit` and every config check run on machines (a laptop, CI) that need no torch.
    probe = ("import sys, rr.config, rr.deploy.cli, rr.deploy.rayjob, rr.deploy.kube; "
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
