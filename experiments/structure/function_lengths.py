"""Prints the longest functions of jaxcifar/ and models/ (lines, parameters), longest first.

Usage: python experiments/structure/function_lengths.py [REPO_ROOT] [--top N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def lengths(root: Path) -> list[tuple[int, int, str]]:
    """Returns (lines, parameters, "file:function") for every function and method under root's packages."""
    found = []
    for path in sorted([*root.glob("jaxcifar/**/*.py"), *root.glob("models/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                count -= 1 if args.args and args.args[0].arg in ("self", "cls") else 0
                lines = node.end_lineno - node.lineno + 1
                found.append((lines, count, f"{path.relative_to(root)}:{node.name}"))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=".", help="repository root (default: .)")
    parser.add_argument("--top", type=int, default=15, help="how many functions to list (default: 15)")
    args = parser.parse_args()
    rows = lengths(Path(args.root))
    print(f"{'lines':>5} {'params':>6}  function")
    for lines, params, name in rows[: args.top]:
        print(f"{lines:5d} {params:6d}  {name}")
    most = max(rows, key=lambda r: r[1])
    print(f"most parameters: {most[2]} ({most[1]})")


if __name__ == "__main__":
    main()
