"""Two rules of the code's shape, read from src/sftlab with `ast` (nothing imported):

- every function reads in one screen: no `def` longer than MAX_LINES lines (its signature to its last line);
- a method's name is its registry entry's business: outside methods/ and config.py nothing compares a method's
  name with a string (`cfg.method == "lora"`, `method.name in ("full", "qlora")`); code asks the method's
  registry entry (methods/registry.py) instead, so a new method is one entry, not a hunt through the tree."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sftlab"
MAX_LINES = 60
METHOD_NAMES = {"full", "lora", "qlora", "adapter", "prompt", "ptuning", "prefix"}
"""config.py's method names (a test below keeps them equal to the registry's)."""


def sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for path in sorted(ROOT.rglob("*.py"))]


def long_functions(tree: ast.Module, limit: int) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function or method longer than `limit` lines."""
    return [(node.lineno, node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_is_longer_than_one_screen() -> None:
    found = [f"{path.relative_to(ROOT.parent)}:{line} {name} ({length} lines)"
             for path, tree in sources() for line, name, length in long_functions(tree, MAX_LINES)]
    assert not found, f"functions longer than {MAX_LINES} lines (split each into named steps):\n" + "\n".join(found)


def names_a_method(node: ast.AST) -> bool:
    """`method`, `cfg.method`, `method.name`, `setup.method.name`, `saved.method`, `method_name`, ..."""
    if isinstance(node, ast.Name):
        return "method" in node.id.lower()
    if isinstance(node, ast.Attribute):
        return node.attr == "method" or "method" in node.attr.lower() or (
            node.attr == "name" and names_a_method(node.value))
    return False


def method_strings(node: ast.AST) -> set[str]:
    """The method names among a constant or a tuple/list/set of constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value} & METHOD_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {s for element in node.elts for s in method_strings(element)}
    return set()


def method_name_comparisons(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(names_a_method(o) for o in operands) and any(method_strings(o) for o in operands):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_method_name_comparison_outside_methods_and_config() -> None:
    allowed = {ROOT / "config.py", *(ROOT / "methods").rglob("*.py")}
    found = [f"{path.relative_to(ROOT.parent)}:{line} {text}" for path, tree in sources() if path not in allowed
             for line, text in method_name_comparisons(tree)]
    assert not found, "a method's name compared outside methods/ and config.py (ask its registry entry, " \
        "methods/registry.py, for what it needs):\n" + "\n".join(found)


def test_the_checks_see_what_they_look_for() -> None:
    made_up = ast.parse("def f(cfg, method):\n    if cfg.method == 'full' or method.name in ('lora', 'x'):\n"
                        "        pass\n    return 'qlora' != setup.method.name\n" + "    x = 1\n" * 60)
    assert sorted(line for line, _ in method_name_comparisons(made_up)) == [2, 2, 4]
    assert not method_name_comparisons(ast.parse("ok = stage == 'dpo' and fmt in ('prompt', 'completion')"))
    assert long_functions(made_up, MAX_LINES) == [(1, "f", 64)]


def test_the_method_names_are_the_registry_s() -> None:
    from sftlab.methods import METHODS

    assert set(METHODS) == METHOD_NAMES
