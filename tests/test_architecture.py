"""The import graph of promptseg, read from the source (AST only, nothing is imported or run).

Every ``import`` counts wherever it stands: at module level, inside a function (a lazy import
still ties the two modules together) and under ``if TYPE_CHECKING:`` (a type-only import is
still a dependency a reader must follow). Relative imports are resolved. ``from pkg import name``
points at the module ``pkg.name`` when there is one, else at ``pkg``. Importing ``a.b`` runs
``a/__init__.py`` too, but that implicit edge is not drawn: a package's ``__init__`` may
re-export its children without making every child depend on its siblings.

Rules:

* no cycle among the modules of the core and the adapters;
* the core (``core/``, imported as ``promptseg``) imports no host package;
* an adapter (``plugins/X/``, imported as ``promptseg_X``) imports no other adapter.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "promptseg": ROOT / "core",
    "promptseg_fiftyone": ROOT / "plugins" / "fiftyone",
    "promptseg_napari": ROOT / "plugins" / "napari",
    "promptseg_labelstudio": ROOT / "plugins" / "labelstudio",
    "promptseg_app": ROOT / "plugins" / "app",
}
CORE = "promptseg"
ADAPTERS = ("promptseg_fiftyone", "promptseg_napari", "promptseg_labelstudio", "promptseg_app")
HOSTS = (
    "fiftyone", "napari", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide6", "label_studio_sdk", "label_studio_ml",
    "flask", "waitress", "gunicorn", "gradio", *ADAPTERS,
)


@dataclass
class ImportGraph:
    """Which project module imports which (`edges`), and which outside packages (`external`)."""

    modules: dict[str, Path]
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    """module -> {imported project module: line of the first such import}"""
    external: dict[str, dict[str, int]] = field(default_factory=dict)
    """module -> {top-level name of an imported outside package: line}"""


def find_modules(packages: Mapping[str, Path]) -> dict[str, Path]:
    """Every ``.py`` file below each package folder, by its import name."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterable[tuple[str, str | None]]:
    """``(module, name)`` pairs one import statement asks for (`name` None for ``import x``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name, None
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            yield base, alias.name


def build_graph(packages: Mapping[str, Path]) -> ImportGraph:
    """Parse every module of `packages` and resolve its imports."""
    graph = ImportGraph(find_modules(packages))
    for module, path in graph.modules.items():
        edges, external = graph.edges.setdefault(module, {}), graph.external.setdefault(module, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            for target, name in _imported(node, module, path.name == "__init__.py"):
                if name is not None and f"{target}.{name}" in graph.modules:
                    target = f"{target}.{name}"
                while target and target not in graph.modules and target.split(".")[0] in packages:
                    target = target.rpartition(".")[0]  # an attribute of a module, not a module
                if target in graph.modules:
                    if target != module:
                        edges.setdefault(target, node.lineno)
                elif target:
                    external.setdefault(target.split(".")[0], node.lineno)
    return graph


def find_cycles(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per group of mutually importing modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return [_cycle_through(group, edges) for group in sorted(groups)]


def _cycle_through(group: list[str], edges: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in members and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{group} is strongly connected but has no cycle through {start}")


def violations(
    graph: ImportGraph, core: str = CORE, adapters: Iterable[str] = ADAPTERS, hosts: Iterable[str] = HOSTS
) -> list[str]:
    """Every broken rule, one readable line each (empty when the layout is sound)."""
    adapters, hosts = set(adapters), set(hosts)
    problems = []
    for cycle in find_cycles(graph.edges):
        steps = [f"{a} (line {graph.edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
        problems.append("import cycle: " + " -> ".join(steps + [cycle[-1]]))
    for module, imported in sorted(graph.external.items()):
        if module.split(".")[0] == core:
            for name, line in sorted(imported.items()):
                if name in hosts:
                    problems.append(f"{module} (line {line}) imports the host package {name}")
    for module, targets in sorted(graph.edges.items()):
        adapter = module.split(".")[0]
        for target, line in sorted(targets.items()):
            other = target.split(".")[0]
            if adapter in adapters and other in adapters and other != adapter:
                problems.append(f"{module} (line {line}) imports another adapter: {target}")
    return problems


def test_the_project_has_no_cycle_no_host_import_in_the_core_and_no_adapter_to_adapter_import():
    problems = violations(build_graph(PACKAGES))
    assert not problems, "\n".join(problems)


def test_the_walk_sees_the_whole_project():
    """Guards the test above against passing on an empty or half-read graph."""
    graph = build_graph(PACKAGES)
    assert len([m for m in graph.modules if m.startswith("promptseg.")]) >= 30
    for adapter in ADAPTERS:
        assert any(m.startswith(adapter + ".") for m in graph.modules), adapter
    assert "promptseg.cache" in graph.edges["promptseg.segmenter"]  # a module-level import
    assert "promptseg.plugins" in graph.edges["promptseg.segmenter"]  # an import inside a function
    assert "fiftyone" in graph.external["promptseg_fiftyone.runner"]
    assert "promptseg.errors" in graph.edges["promptseg_labelstudio.model"]


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_cycles_host_imports_and_adapter_imports(tmp_path):
    """A synthetic project with one of each fault: each is reported, with where it happens."""
    _write(tmp_path, {
        "core/__init__.py": "",
        "core/errors.py": "class E(Exception):\n    pass\n",
        # a cycle made only of a lazy import and a type-only relative import
        "core/stages/__init__.py": "",
        "core/stages/a.py": "def run():\n    from promptseg.stages.b import helper\n",
        "core/stages/b.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n"
            "from ..errors import E\n"
        ),
        "core/view.py": "def show():\n    import napari.viewer\n",
        "plugins/one/__init__.py": "from promptseg_two.widget import Widget\n",
        "plugins/two/__init__.py": "",
        "plugins/two/widget.py": "import promptseg.errors\nWidget = object\n",
    })
    packages = {"promptseg": tmp_path / "core", "promptseg_one": tmp_path / "plugins" / "one",
                "promptseg_two": tmp_path / "plugins" / "two"}
    graph = build_graph(packages)
    assert graph.edges["promptseg.stages.b"] == {"promptseg.stages.a": 3, "promptseg.errors": 4}
    assert graph.edges["promptseg_two.widget"] == {"promptseg.errors": 1}
    assert violations(graph, adapters=("promptseg_one", "promptseg_two")) == [
        "import cycle: promptseg.stages.a (line 2) -> promptseg.stages.b (line 3) -> promptseg.stages.a",
        "promptseg.view (line 2) imports the host package napari",
        "promptseg_one (line 1) imports another adapter: promptseg_two.widget",
    ]


def test_the_checker_is_quiet_on_a_sound_project(tmp_path):
    _write(tmp_path, {
        "core/__init__.py": "from promptseg.errors import E\n",
        "core/errors.py": "class E(Exception):\n    pass\n",
        "core/stage.py": "from .errors import E\nimport numpy as np\n",
    })
    graph = build_graph({"promptseg": tmp_path / "core"})
    assert graph.edges["promptseg.stage"] == {"promptseg.errors": 1}
    assert graph.external["promptseg.stage"] == {"numpy": 2}
    assert violations(graph) == []


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("promptseg.verify", "promptseg.clip.verify", "decide"),
        ("promptseg.suggest", "promptseg.clip.suggest", "suggest_prompts"),
        ("promptseg.suggest", "promptseg.clip.mapping", "map_to_labels"),
        ("promptseg.vocabulary", "promptseg.clip.vocabulary", "load_vocabulary"),
        ("promptseg.clip_testing", "promptseg.testing.clip", "make_random_clip"),
        ("promptseg.backends.base", "promptseg.backends.protocol", "Detections"),
        ("promptseg.backends.base", "promptseg.backends.sam3_common", "split_detections"),
        ("promptseg.backends.openclip", "promptseg.clip.openclip", "parse_model"),
        ("promptseg.backends.sam3_meta", "promptseg.backends.meta", "resolve_checkpoint"),
        ("promptseg.backends.meta_device", "promptseg.backends.meta.device", "DeviceRedirect"),
    ],
)
def test_a_moved_module_still_imports_from_its_old_path_with_a_deprecation_warning(old, new, name, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import it afresh, so it warns again
    with pytest.warns(DeprecationWarning, match=f"{re.escape(old)} has moved to .*{re.escape(new)}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_old_paths_are_shims_that_nothing_in_the_project_imports():
    graph = build_graph(PACKAGES)
    shims = {"promptseg.verify", "promptseg.suggest", "promptseg.vocabulary", "promptseg.clip_testing",
             "promptseg.backends.base", "promptseg.backends.openclip", "promptseg.backends.sam3_meta",
             "promptseg.backends.meta_device"}
    assert shims <= set(graph.modules)
    users = {module: sorted(shims & set(targets)) for module, targets in graph.edges.items() if shims & set(targets)}
    assert users == {}


# Private members of objects outside promptseg that promptseg has no public way to reach.
OUTSIDE_PRIVATE = {("promptseg.backends.meta.backend", "self.model._get_dummy_prompt")}  # Meta's sam3 model


def private_reaches(source: str) -> list[str]:
    """``obj._member`` uses in `source` where ``obj`` is not ``self`` or ``cls``: one module reaching
    into another object's internals (as ``segmenter._lock`` from the tiling module once did)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(ast.unparse(node))
    return found


def test_core_stages_use_no_private_member_of_another_object():
    modules = find_modules({CORE: PACKAGES[CORE]})
    reaches = {(module, use) for module, path in modules.items() for use in private_reaches(path.read_text())}
    assert reaches == OUTSIDE_PRIVATE
    assert private_reaches("with segmenter._lock:\n    segmenter._decode(f)\nself._cache\n") == [
        "segmenter._lock", "segmenter._decode",
    ]


def test_test_modules_have_unique_names():
    """pytest imports every test file by its base name (no packages under tests/): two files of one
    name in different folders stop the whole run at collection."""
    from collections import Counter

    tests = Path(__file__).resolve().parent
    names = Counter(path.name for path in tests.rglob("*.py") if "__pycache__" not in path.parts)
    assert not [name for name, count in names.items() if count > 1 and name != "conftest.py"]


def test_every_package_is_in_the_distribution():
    """A package missing from pyproject's list works in an editable install and is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join([top, *init.parent.relative_to(folder).parts])
        for top, folder in PACKAGES.items()
        for init in folder.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"
