"""The floors of src/sftlab (DESIGN.md, Layout): a lower floor never imports a higher one, and no modules
import each other in a circle. Every import counts: at the top of a module and inside a function (deferred);
one under `if TYPE_CHECKING:` counts as upward (the type belongs to a higher floor) but not towards a circle
(it never runs). Read from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sftlab"

FLOORS: dict[str, int] = {
    "sftlab": 0, "sftlab.errors": 0, "sftlab.files": 0, "sftlab.config": 0, "sftlab.libc": 0,
    "sftlab.data": 1, "sftlab.models": 1,
    "sftlab.methods": 2,
    "sftlab.export": 3,
    "sftlab.train": 4,
    "sftlab.runs": 5, "sftlab.generate": 5, "sftlab.eval": 5,
    "sftlab.cli": 6, "sftlab.__main__": 7,
}
"""Module (or package) -> floor: errors, files, config < data, models < methods < export < train < runs,
generate, eval < cli. `sftlab` is the package's own __init__ (its version string)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def floor(module: str) -> int:
    """The floor of the longest prefix FLOORS names (sftlab.train.loop -> sftlab.train)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise AssertionError(f"{module} is on no floor: add it (or its package) to FLOORS in tests/test_layering.py "
                         "and to DESIGN.md's Layout")


def typing_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(inner) for part in node.body for inner in ast.walk(part)}
    return found


def imports(module: str, path: Path, known: dict[str, Path], *, runtime: bool = False) -> dict[str, int]:
    """The sftlab modules `module` imports anywhere in its file -> the line of the first such import
    (`runtime`: leaving out the imports under `if TYPE_CHECKING:`)."""
    found: dict[str, int] = {}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = typing_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from sftlab import files`: the submodule when there is one, else the package itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if target.split(".")[0] == "sftlab" and target != module:
                while target not in known:  # `import sftlab.data.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                found.setdefault(target, node.lineno)
    return found


def graph(*, runtime: bool = False) -> dict[str, dict[str, int]]:
    known = modules()
    return {module: imports(module, path, known, runtime=runtime) for module, path in known.items()}


def test_no_lower_floor_imports_a_higher_one() -> None:
    upward = [f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)}) at "
              f"{modules()[module].relative_to(ROOT.parent)}:{line}"
              for module, targets in graph().items() for target, line in targets.items()
              if floor(target) > floor(module)]
    assert not upward, "upward imports (move the code to the lower floor, or the caller up):\n" + "\n".join(upward)


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle through each strongly connected group of modules (Tarjan), as the modules in order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [circle(edges, set(group)) for group in groups]


def circle(edges: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A path from the group's first module back to itself, through the group (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(edges.get(node, {})):
            if target == start:
                return paths[node] + [start]
            if target in group and target not in paths:
                paths[target] = paths[node] + [target]
                queue.append(target)
    return sorted(group)


def test_no_import_circles() -> None:
    edges = graph(runtime=True)
    found = [" -> ".join(f"{a} (line {edges[a][b]})" for a, b in itertools.pairwise(path)) + f" -> {path[-1]}"
             for path in cycles(edges)]
    assert not found, "import circles (each module imports the next; line numbers are in the importer):\n" + \
        "\n".join(found)


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The test's own reading: a deferred import inside a function is seen, and a made-up circle is found."""
    edges = graph()
    assert "sftlab.models.load" in edges["sftlab.cli"] or "sftlab.runs" in edges["sftlab.cli"]
    made_up = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(made_up) == [["a", "b", "c", "a"]]
    assert floor("sftlab.train.loop") == 4 and floor("sftlab.data.encode") == 1
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sftlab.cli\n"
                      "import sftlab.errors\n")
    assert len(typing_only(typed)) == 2  # the Import node and its alias
