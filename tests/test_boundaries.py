"""Module boundaries, read from the source: generic modules never import a
built-in world, and module-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metaunlearn"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of the modules `path` imports (`from x import y` counts x and x.y)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_generic_module_imports_a_built_in_world():
    worlds = PACKAGE / "worlds"
    offenders = {module_name(p): sorted(i for i in imports(p) if i.startswith("metaunlearn.worlds.digits"))
                 for p in sources() if worlds not in p.parents}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_the_boundary_check_sees_imports(tmp_path):
    """The check above must fail on a violation: try it on a module that has one."""
    fake = tmp_path / "metaunlearn" / "metrics" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..worlds.digits.dataset import DIGIT_WORDS\n\ndef f():\n"
                    "    import metaunlearn.worlds.digits.build\n")
    found = imports(fake, root=tmp_path)
    assert {"metaunlearn.worlds.digits.dataset", "metaunlearn.worlds.digits.build"} <= found
    assert "metaunlearn.worlds.digits.build" not in imports(fake, top_level_only=True, root=tmp_path)


def test_module_level_imports_form_no_cycle():
    """Package __init__ files import their own plugins by design, so only modules are graphed."""
    modules = {module_name(p): p for p in sources() if p.name != "__init__.py"}
    graph = {name: {i for i in imports(path, top_level_only=True) if i in modules and i != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
