"""`calculator`: arithmetic by walking the expression's syntax tree, never eval."""

from __future__ import annotations

import ast
import re
import warnings
import math
import operator
from collections.abc import Callable
from typing import Any

from .registry import ToolCallError, tool

CALCULATOR_MAX_CHARS = 200
CALCULATOR_MAX_EXPONENT = 100
CALCULATOR_MAX_DIGITS = 300  # integers beyond this many digits are refused (no runaway big-int work)

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, unary minus, parentheses.

    The expression is parsed into a Python syntax tree and only those nodes are
    evaluated; anything else (names, calls, attributes, strings) is refused, so nothing
    the expression says can run code. `^` means power, `×` and a spaced ` x ` multiply,
    `÷` divides.
    Exponents are limited to CALCULATOR_MAX_EXPONENT and integers to
    CALCULATOR_MAX_DIGITS digits. Raises ToolCallError with the reason.
    """
    if len(expression) > CALCULATOR_MAX_CHARS:
        raise ToolCallError(f"the expression is {len(expression)} characters long; the limit is {CALCULATOR_MAX_CHARS}")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"\s[xX]\s", " * ", text).strip()  # "3 x 4"
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: the model's text, not our bug
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolCallError(f"{expression!r} is not an arithmetic expression") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolCallError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolCallError("division by zero") from None
        except OverflowError:
            raise ToolCallError("the result is too large") from None
        if isinstance(value, complex):
            raise ToolCallError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > CALCULATOR_MAX_DIGITS * 3.33:
            raise ToolCallError(f"the result has more than {CALCULATOR_MAX_DIGITS} digits")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolCallError("the result is too large")
        return value
    what = {ast.Name: "a name", ast.Call: "a function call", ast.Attribute: "an attribute",
            ast.Subscript: "indexing", ast.Compare: "a comparison", ast.BoolOp: "a logical operator"}
    found = next((v for k, v in what.items() if isinstance(node, k)), type(node).__name__)
    raise ToolCallError(f"only numbers, + - * / // % ** and parentheses are allowed; found {found}")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > CALCULATOR_MAX_EXPONENT:
        raise ToolCallError(f"the exponent {exponent} is too large; the limit is {CALCULATOR_MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > CALCULATOR_MAX_DIGITS * 3.33:
            raise ToolCallError(f"the result has more than {CALCULATOR_MAX_DIGITS} digits")


def format_number(value: int | float) -> str:
    """A calculator result as text: integers as they are, floats without a trailing .0 and rounded to 10 places."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{round(value, 10):.10g}" if abs(value) < 1e15 else repr(value)
    return str(value)


@tool(
    "calculator",
    description="Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) and return its value.",
    parameters={"expression": {"type": "string", "description": "e.g. \"347 * 29\""}},
)
def calculator_tool(expression: str) -> str:
    return format_number(calculate(expression))
