"""The package stays readable in pieces: no module over 500 lines, no function over 60
(its docstring not counted), and `RLTrainer.step` one screen of named phases.

Benchmarks and tests are exempt; they are read less and may run long scripts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "tools", "data", "model", "rewards", "rollouts", "rl")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from `def` to the function's end, without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def package_files() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def test_no_module_is_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in package_files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"modules over {MAX_FILE_LINES} lines (split them by what they do): {long}"


def test_no_function_is_over_60_lines() -> None:
    long = {}
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and function_lines(node) > MAX_FUNCTION_LINES:
                long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = function_lines(node)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_step_reads_as_its_phases() -> None:
    tree = ast.parse((ROOT / "rl" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RLTrainer")
    step = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "step")
    assert function_lines(step) <= 40
    calls = [n for n in ast.walk(step) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    called = [n.func.attr for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset))]
    phases = ["_collect", "_check_versions", "_batch_tensors", "_reference_and_values", "_advantages", "train_on", "_sync"]
    assert [c for c in called if c in phases] == phases  # each phase once, in this order


def test_the_measure_counts_what_it_says() -> None:
    source = 'def f(x):\n    """Doc\n    more doc."""\n    y = x\n    return y\n'
    assert function_lines(ast.parse(source).body[0]) == 3
