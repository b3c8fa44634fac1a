"""The size rule: no module over 450 lines, no function over 80.

Checks every Python module under anodev2_jax/ and the entry points at the repository root
(train.py, reproduce.py, figures.py, evaluate.py, those present). A module's size is its
number of lines; a function's (or method's, nested ones included, each on its own) runs from
its ``def`` line to its last line, decorators and docstring left out. Prints one line per
offender, ``path:line: name has N lines (limit L)``, and exits 1; when all pass, prints one
line naming the largest module and the largest function. Standard library only.

    python3 .ci/check_sizes.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anodev2_jax"
ENTRY_POINTS = ("train.py", "reproduce.py", "figures.py", "evaluate.py")
MODULE_LIMIT = 450
FUNCTION_LIMIT = 80


def modules() -> list[Path]:
    package = sorted(
        path for path in (ROOT / PACKAGE).rglob("*.py") if "__pycache__" not in path.parts
    )
    return package + [ROOT / name for name in ENTRY_POINTS if (ROOT / name).is_file()]


def function_sizes(tree: ast.AST) -> list[tuple[int, str, int]]:
    """(def line, qualified name, lines without the docstring) of every function in tree."""
    sizes: list[tuple[int, str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                size = (child.end_lineno or child.lineno) - child.lineno + 1
                body = child.body
                if (
                    body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)
                ):
                    size -= (body[0].end_lineno or body[0].lineno) - body[0].lineno + 1
                sizes.append((child.lineno, name, size))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return sizes


def main() -> int:
    offenders: list[str] = []
    largest_module = (0, "")
    largest_function = (0, "")
    for path in modules():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MODULE_LIMIT:
            offenders.append(f"{rel}:1: module has {lines} lines (limit {MODULE_LIMIT})")
        largest_module = max(largest_module, (lines, rel))
        try:
            tree = ast.parse(text, filename=rel)
        except SyntaxError as error:
            offenders.append(f"{rel}:{error.lineno}: cannot parse: {error.msg}")
            continue
        for line, name, size in function_sizes(tree):
            if size > FUNCTION_LIMIT:
                offenders.append(
                    f"{rel}:{line}: function {name} has {size} lines (limit {FUNCTION_LIMIT})"
                )
            largest_function = max(largest_function, (size, f"{rel}:{line} {name}"))
    if offenders:
        print("\n".join(offenders))
        print(
            f"check_sizes: {len(offenders)} over the limits (modules {MODULE_LIMIT} lines, "
            f"functions {FUNCTION_LIMIT} lines without the docstring)",
            file=sys.stderr,
        )
        return 1
    print(
        f"check_sizes: all within limits; largest module {largest_module[1]} "
        f"({largest_module[0]}/{MODULE_LIMIT} lines), largest function {largest_function[1]} "
        f"({largest_function[0]}/{FUNCTION_LIMIT} lines)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
