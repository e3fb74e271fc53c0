"""The examples in README.md and docs/*.md work as written, so the docs cannot drift from the code.

A code block is checked when the line before its fence is a marker:

    <!-- example: run -->              the full check (below)
    <!-- example: parse -->            only that it parses
    <!-- example: run file=NAME -->    also saved as NAME for the page's later blocks (a reward
                                       module that a recipe names, a recipe that a command trains)

By language:

- python: `parse` compiles it and finds every `vocalign.*` module it imports; `run` executes
  it with this venv's python in a fresh folder holding the page's earlier `file=` blocks
  (HF_HUB_OFFLINE=1, OMP_NUM_THREADS=1, a timeout).
- yaml: every block is a recipe, whole or in part (a recipe states only what differs from
  the defaults). `parse` loads it with the recipe loader (`vocalign.rl.recipe.load_recipe`:
  every key known, every value of its type); `run` also runs `check_recipe`
  (`vocalign.rl.config`: cross-key checks, rewards and tools resolved, paths exist), and,
  when the page defines modules, does so in their folder in a subprocess and scores the
  recipe's `module:function` rewards on two small rollouts.
- json: the block, or each of its lines (JSON lines), is JSON.
- bash: never executed; mark it `parse`. Each `vocalign ...` command (also after
  `.venv/bin/`, `deepspeed --module` or `torchrun -m`) is parsed by the CLI's own parser;
  a `train` recipe must exist (a path in the repository, a `file=` block of the page, or a
  packaged recipe's name) and its overrides must fit the recipe schema (applied to the
  defaults after an all-capitals placeholder such as RECIPE); `eval` suites and variations
  must be known. `make` targets must exist in the Makefile, `python -m MODULE` modules must
  be importable (`importlib.util.find_spec`), `python script.py` and `bash script.sh`
  scripts must exist, and a `python - <<EOF` heredoc must compile.

Besides: every docs page the README links to exists and every page in docs/ is linked from
it, every relative link and anchor in the README and docs resolves, and the README stays a
front door (at most README_MAX_LINES lines).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 260
MIN_EXAMPLES = 37  # the marked blocks there are now; fewer means markers were lost
TIMEOUT_S = 120

MODES = {  # language -> the marks it may carry
    "python": {"run", "parse"},
    "yaml": {"run", "parse"},
    "json": {"parse"},
    "bash": {"parse"},
}
LANGS = {"py": "python", "python": "python", "yaml": "yaml", "yml": "yaml", "json": "json", "jsonl": "json",
         "bash": "bash", "sh": "bash", "shell": "bash"}

MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # RECIPE, RUN_DIR: words to replace, not files


@dataclass
class Example:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    mode: str
    code: str
    file: str | None = None  # `file=NAME`: saved under this name for the page's later blocks
    earlier_files: dict[str, str] = field(default_factory=dict)  # the page's `file=` blocks before this one

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def collect() -> tuple[list[Example], list[str]]:
    """Every marked block of every page, and the problems with the markers themselves."""
    examples: list[Example] = []
    problems: list[str] = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        files: dict[str, str] = {}
        i = 0
        while i < len(lines):
            marker = MARKER.match(lines[i])
            if not marker:
                i += 1
                continue
            where = f"{page.relative_to(REPO)}:{i + 1}"
            fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not fence:
                problems.append(f"{where}: an example marker must be on the line just before a code fence")
                i += 1
                continue
            words = marker["body"].split()
            mode, options = (words[0] if words else ""), words[1:]
            lang = LANGS.get(fence["lang"].lower(), fence["lang"] or "(none)")
            body, j = [], i + 2
            while j < len(lines) and not (lines[j].strip().startswith(fence["fence"]) and not lines[j].strip().strip(fence["fence"][0])):
                body.append(lines[j])
                j += 1
            if j == len(lines):
                problems.append(f"{where}: the code fence is not closed")
            code = textwrap.dedent("\n".join(body)) + "\n"
            file = None
            for option in options:
                key, _, value = option.partition("=")
                if key == "file" and value:
                    file = value
                else:
                    problems.append(f"{where}: unknown example option {option!r} (only file=NAME)")
            if lang not in MODES:
                problems.append(f"{where}: {lang} blocks are not checked; mark python, yaml, json or bash blocks")
            elif mode not in MODES[lang]:
                problems.append(f"{where}: a {lang} block may be marked {' or '.join(sorted(MODES[lang]))}, not {mode!r}")
            else:
                examples.append(Example(page, i + 2, lang, mode, code, file, dict(files)))
            if file:
                files[file] = code
            i = j + 1
    return examples, problems


EXAMPLES, MARKER_PROBLEMS = collect()


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH", "")]))
    return env


def _workspace(example: Example, tmp_path: Path) -> Path:
    """A fresh folder with the page's earlier `file=` blocks in it."""
    for name, code in example.earlier_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code, encoding="utf-8")
    return tmp_path


def _run_python(script: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=_env(cwd), capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


# --- python ------------------------------------------------------------------------------


def check_python(example: Example, tmp_path: Path) -> None:
    tree = compile(example.code, example.id, "exec", ast.PyCF_ONLY_AST)
    if example.mode == "parse":
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        for module in sorted(m for m in modules if m.startswith("vocalign.")):
            assert _find_spec(module), f"{example.id} imports {module}, which is not importable"
        return
    folder = _workspace(example, tmp_path)
    script = folder / (example.file or "example.py")
    script.write_text(example.code, encoding="utf-8")
    _run_python(script, folder)


def _find_spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# --- yaml --------------------------------------------------------------------------------

# Run in the folder of the page's modules: check the recipe, then score its own rewards.
RECIPE_CHECK = """\
import math
import sys

sys.path.insert(0, ".")
from vocalign.rl.config import Recipe, check_recipe
from vocalign.rl.recipe import load_recipe

recipe = load_recipe(sys.argv[1], [], Recipe)
check_recipe(recipe)
own = [spec for spec in recipe.rewards if ":" in spec.name]
if own:
    import numpy as np
    from vocalign.data.types import Prompt, Rollout
    from vocalign.rewards import score

    def rollout(text, waveform):
        return Rollout(prompt=Prompt(id="p0", messages=[], meta={"answer": 7}), text=text, think="", spoken_text=text,
                       audio_tokens=[], waveform=waveform, sample_rate=16000, prompt_ids=[], response_ids=[], logprobs=[])

    rollouts = [rollout("7", np.zeros(8000, dtype=np.float32)), rollout("it is seven", None)]
    scores = score(rollouts, own)
    assert len(scores.total) == 2 and all(math.isfinite(t) for t in scores.total), scores
    print("scored", scores.components)
"""


def check_yaml(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(example.code)
    assert isinstance(data, dict), f"{example.id}: a recipe (or part of one) is a mapping, got {type(data).__name__}"
    folder = _workspace(example, tmp_path)
    recipe_file = folder / (example.file or "example_recipe.yaml")
    recipe_file.write_text(example.code, encoding="utf-8")
    if example.mode == "run" and any(name.endswith(".py") for name in example.earlier_files):
        checker = folder / "_check_recipe.py"
        checker.write_text(RECIPE_CHECK, encoding="utf-8")
        _run_python(checker, folder, recipe_file.name)
        return
    from vocalign.rl.config import Recipe, check_recipe
    from vocalign.rl.recipe import load_recipe

    monkeypatch.chdir(REPO)  # relative paths in a recipe start from where `vocalign train` runs
    recipe = load_recipe(recipe_file, [], Recipe)
    if example.mode == "run":
        check_recipe(recipe)


# --- json --------------------------------------------------------------------------------


def check_json(example: Example) -> None:
    try:
        json.loads(example.code)
    except json.JSONDecodeError:
        for n, line in enumerate(example.code.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise AssertionError(f"{example.id}, line {n} of the block is not JSON: {e}") from None


# --- bash --------------------------------------------------------------------------------

SEPARATORS = {"&&", "||", ";", "|"}
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<end>\w+)\1")


def shell_commands(code: str) -> list[tuple[list[str], str | None]]:
    """Each command of a shell block as its words, with the heredoc it reads (if any)."""
    lines = code.splitlines()
    commands: list[tuple[list[str], str | None]] = []
    i, pending = 0, ""
    while i < len(lines):
        line = pending + lines[i]
        i += 1
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        heredoc = None
        if m := HEREDOC.search(line):
            body = []
            while i < len(lines) and lines[i].strip() != m["end"]:
                body.append(lines[i])
                i += 1
            i += 1  # the end word
            heredoc = "\n".join(body) + "\n"
            line = line[: m.start()] + line[m.end():]
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words, command = list(lexer), []
        for word in words + [";"]:
            if word in SEPARATORS:
                if command:
                    commands.append((command, heredoc))
                command = []
            else:
                command.append(word)
    return commands


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return {m[1] for m in re.finditer(r"^([\w.-]+)\s*:(?!=)", text, re.M)}


def check_bash(example: Example, tmp_path: Path) -> None:
    folder = _workspace(example, tmp_path)
    commands = shell_commands(example.code)
    assert commands, f"{example.id}: no command found"
    for words, heredoc in commands:
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value before the command
            words = words[1:]
        if not words:
            continue
        program, args = os.path.basename(words[0]), words[1:]
        shown = " ".join(words)
        if program == "vocalign":
            check_vocalign(args, example, folder, shown)
        elif program in ("deepspeed", "torchrun"):
            flags = [k for k, a in enumerate(args) if a in ("-m", "--module")]
            assert flags and flags[0] + 1 < len(args), f"{example.id}: `{shown}` names no module to launch"
            module = args[flags[0] + 1]
            assert _find_spec(module), f"{example.id}: `{shown}`: module {module} is not importable"
            if module == "vocalign.rl.cli":
                check_vocalign(args[flags[0] + 2:], example, folder, shown)
        elif re.fullmatch(r"python[\d.]*", program):
            check_python_command(args, heredoc, example, folder, shown)
        elif program == "make":
            targets = [a for a in args if "=" not in a and not a.startswith("-")]
            missing = sorted(set(targets) - makefile_targets())
            assert not missing, f"{example.id}: `{shown}`: no Makefile target {missing}"
        elif program in ("bash", "sh") and args:
            assert (REPO / args[0]).is_file(), f"{example.id}: `{shown}`: no script {args[0]} in the repository"


def check_python_command(args: list[str], heredoc: str | None, example: Example, folder: Path, shown: str) -> None:
    if args[:1] == ["-m"]:
        module = args[1]
        assert _find_spec(module), f"{example.id}: `{shown}`: module {module} is not importable"
        if module == "vocalign.rl.cli":
            check_vocalign(args[2:], example, folder, shown)
    elif args[:1] == ["-"]:
        assert heredoc is not None, f"{example.id}: `{shown}` reads a script from stdin, but there is no heredoc"
        compile(heredoc, f"{example.id} (heredoc)", "exec")
    elif args and args[0].endswith(".py"):
        assert (REPO / args[0]).is_file() or (folder / args[0]).is_file(), (
            f"{example.id}: `{shown}`: no script {args[0]} in the repository or on the page")


def check_vocalign(args: list[str], example: Example, folder: Path, shown: str) -> None:
    """Parse as `vocalign.rl.cli.main` does, then check what the parsed command names."""
    from vocalign.rl.cli import parser

    p = parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            ns, extra = p.parse_known_args([a for a in args if a != "--debug"])
    except SystemExit:
        raise AssertionError(f"{example.id}: `{shown}` does not parse:\n{stderr.getvalue()}") from None
    if extra:  # main: overrides after an option are overrides too; anything else is an error
        assert ns.command == "train" and all("=" in e and not e.startswith("-") for e in extra), (
            f"{example.id}: `{shown}`: unrecognized arguments {extra}")
        ns.overrides += extra
    if ns.command == "train":
        check_train(ns.recipe, ns.overrides, example, folder, shown)
    elif ns.command == "eval":
        from vocalign.rl.evaluation import Variation, get_suite

        for name in (ns.suite or []) + [item.partition("=")[0] for item in ns.data]:
            get_suite(name)
        Variation.parse(ns.variation)


def check_train(recipe: str, overrides: list[str], example: Example, folder: Path, shown: str) -> None:
    from vocalign.rl.config import Recipe
    from vocalign.rl.recipe import RecipeError, load_recipe, resolve_recipe_path

    if PLACEHOLDER.fullmatch(recipe):  # RECIPE: the overrides still fit the defaults
        path = folder / "_placeholder_recipe.yaml"
        path.write_text("description: any recipe\n", encoding="utf-8")
    elif recipe in example.earlier_files:
        path = folder / recipe
    elif (REPO / recipe).is_file():
        path = REPO / recipe
    else:
        try:
            path = resolve_recipe_path(recipe)
        except RecipeError as e:
            raise AssertionError(f"{example.id}: `{shown}` trains {recipe!r}, which is neither a file of the "
                                 f"repository, nor a file= block before it on the page, nor a packaged recipe: {e}") from None
    load_recipe(path, overrides, Recipe)  # every override names a known key and fits its type


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_example(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if example.lang == "python":
        check_python(example, tmp_path)
    elif example.lang == "yaml":
        check_yaml(example, tmp_path, monkeypatch)
    elif example.lang == "json":
        check_json(example)
    else:
        check_bash(example, tmp_path)


def test_markers_are_well_formed_and_found() -> None:
    assert not MARKER_PROBLEMS, "\n".join(MARKER_PROBLEMS)
    assert len(EXAMPLES) >= MIN_EXAMPLES, (
        f"only {len(EXAMPLES)} marked examples in README.md and docs/*.md; expected at least {MIN_EXAMPLES}")
    readme = [e for e in EXAMPLES if e.page.name == "README.md"]
    assert any(e.lang == "python" and e.mode == "run" for e in readme), "the README's reward example must be run"
    assert any(e.lang == "yaml" and e.mode == "run" for e in readme), "the README's recipe example must be run"


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_readme_links_every_docs_page() -> None:
    text = _without_code((REPO / "README.md").read_text(encoding="utf-8"))
    linked = {m[1] for m in re.finditer(r"\]\((docs/[^)#\s]+\.md)", text)}
    assert linked, "the README links no docs page"
    missing = sorted(p for p in linked if not (REPO / p).is_file())
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    unlinked = sorted(pages - linked)
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_relative_links_and_anchors_resolve() -> None:
    problems = []
    for page in PAGES:
        text = _without_code(page.read_text(encoding="utf-8"))
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            target = m[1]
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}: link {target!r}"
            if not file.exists():
                problems.append(f"{where}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                problems.append(f"{where}: no heading with anchor #{anchor} in {file.relative_to(REPO)}")
    assert not problems, "\n".join(problems)


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked out."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m["fence"]
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"`[^`]*`", "``", line))
    return "\n".join(out)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    seen: dict[str, int] = {}
    anchors = set()
    fence = None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m["fence"]
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        if h := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h[1])  # a link's text
            slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors
