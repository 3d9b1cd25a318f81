"""ARCHITECTURE.md, checked against the code's own imports: one namespace, no circles, imports
point down the layers, and the role packages never import each other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# where each package's files live (pyproject's package-dir)
FOLDERS = {
    "fedleak": REPO / "fedleak",
    "fedleak.server": REPO / "server",
    "fedleak.clients": REPO / "clients",
    "fedleak.attacker": REPO / "attacker",
    "fedleak.proto": REPO / "proto",
}
ROLES = ("fedleak.server", "fedleak.clients", "fedleak.attacker")
ORCHESTRATION = ("fedleak.cli", "fedleak.federation", "fedleak.studies", "fedleak.ensembler")
TORCH_FREE = ("fedleak.settings", "fedleak.protocol", "fedleak.records", "fedleak.roles")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "fedleak" and parts and f"fedleak.{parts[0]}" in FOLDERS:
                continue
            out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Every fedleak module ``path`` imports, at any depth, except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path, name) - {name} for name, path in MODULES.items()}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> str:
    if _under(module, ORCHESTRATION):
        return "orchestration"
    if _under(module, ROLES):
        return "role"
    return "core"


def test_every_package_is_under_the_fedleak_namespace():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "fedleak" or p.startswith("fedleak.") for p in setuptools["packages"])
    assert set(setuptools["package-dir"]) <= set(setuptools["packages"])


def test_role_folders_are_not_importable_on_their_own(tmp_path):
    """Installed, only `fedleak` is a top-level name: `server`, `clients`, `attacker` and
    `proto` do not shadow (or get shadowed by) anything of the user's."""
    code = (
        "import importlib.util, sys\n"
        "names = ('server', 'clients', 'attacker', 'proto')\n"
        "specs = [importlib.util.find_spec(n) for n in names]\n"
        f"print([s.origin for s in specs if s and (s.origin or '').startswith({str(REPO)!r})])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_no_import_circles():
    index = {}
    low = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in GRAPH:
        if v not in index:
            connect(v)
    assert cycles == []


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
    rank = {"core": 0, "role": 1, "orchestration": 2}
    mine = _layer(module)
    for target in GRAPH[module]:
        assert rank[_layer(target)] <= rank[mine], f"{module} ({mine}) imports {target}"
        if mine == "role" and _layer(target) == "role":
            own = next(r for r in ROLES if _under(module, (r,)))
            assert _under(target, (own,)), f"role {module} imports another role's {target}"


@pytest.mark.parametrize("module", [m for m in sorted(GRAPH) if _under(m, TORCH_FREE)])
def test_settings_protocol_and_records_never_import_torch(module):
    source = MODULES[module].read_text()
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    assert "torch" not in names
    for target in GRAPH[module]:  # nor anything that does, at import time
        assert _under(target, TORCH_FREE + ("fedleak.errors", "fedleak.defenses")) or (
            target == "fedleak"
        ), f"{module} imports {target}"


def test_the_architecture_page_names_every_top_level_folder():
    text = (REPO / "ARCHITECTURE.md").read_text()
    for folder in ("server/", "clients/", "attacker/", "proto/", "deploy/", "fedleak/"):
        assert f"`{folder}`" in text, folder
