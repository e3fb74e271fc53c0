"""Imports only point down the layers, read from the source (nothing is imported to check).

    rl                      the run: config, trainer, runner, command line
    rewards   rollouts      siblings: neither imports the other
    model
    data
    tools     common        the bottom: tools import only common, common imports nothing

Function-level (lazy) imports count too: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"common": 0, "tools": 1, "data": 2, "model": 3, "rewards": 4, "rollouts": 4, "rl": 5}
SIBLINGS = {("rewards", "rollouts"), ("rollouts", "rewards")}


def package_of(module: str) -> str | None:
    """`vocalign.rewards.asr` -> "rewards"; None outside vocalign's layered packages."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vocalign" and parts[1] in LAYERS else None


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the module being `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from vocalign.rewards import paralinguistic` imports a submodule by name
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if (ROOT / Path(*target.split(".")[1:]) / alias.name).with_suffix(".py").exists()]
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in `source` (of `module`) that point up a layer or across to a sibling."""
    here = package_of(module)
    problems = []
    for line, target in imported_modules(source, module, is_package):
        there = package_of(target)
        if here is None or there is None or there == here:
            continue
        if LAYERS[there] > LAYERS[here] or (here, there) in SIBLINGS:
            problems.append(f"{module}:{line} imports {target} ({there} is not below {here})")
    return problems


def package_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
            modules[".".join(["vocalign", *parts])] = path
    return modules


def test_every_import_points_down() -> None:
    problems = []
    for module, path in package_modules().items():
        problems += upward_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
    assert not problems, "imports that point up or across:\n" + "\n".join(problems)


@pytest.mark.parametrize("source, module, expected", [
    ("from vocalign.rl.trainer import RLTrainer\n", "vocalign.model.policy", "model.policy:1 imports vocalign.rl.trainer"),
    ("def f():\n    from vocalign.rewards.workers import RewardWorkers\n", "vocalign.rollouts.group", "rewards is not below rollouts"),
    ("from ..rollouts.worker import RolloutWorker\n", "vocalign.data.synthetic", "imports vocalign.rollouts.worker"),
    ("import vocalign.data.types\n", "vocalign.tools.registry", "data is not below tools"),
])
def test_the_check_catches_an_upward_import(source: str, module: str, expected: str) -> None:
    """The same check, fed a deliberate upward (or sideways) import, reports it."""
    problems = upward_imports(source, module)
    assert len(problems) == 1 and expected in problems[0]


def test_downward_and_stdlib_imports_pass() -> None:
    source = "import os\nfrom vocalign.data.types import Prompt\nfrom .sync import state_checksum\nfrom vocalign.tools import tool\n"
    assert upward_imports(source, "vocalign.rollouts.worker") == []


def test_no_import_cycles_inside_a_package() -> None:
    """Within each layer, the modules' imports (lazy ones included) form no cycle."""
    modules = package_modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            if target in graph and target != module and package_of(target) == package_of(module) \
                    and not module.startswith(target + "."):  # a submodule may import its own package
                graph[module].add(target)
    cycles, done, stack = [], set(), []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
