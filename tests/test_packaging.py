"""The built wheel is a complete, working package.

Builds the wheel from a copy of the source tree, installs it without its
dependencies into a fresh venv that also sees this environment's installed
packages (torch, transformers, ...), and checks that every subpackage imports
from the wheel's files, the recipes are packaged, and `vocalign --help` runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["model", "data", "rollouts", "rewards", "rl", "recipes"]


def source_files(repo: Path) -> list[Path]:
    """Files a checkout would have: tracked plus untracked-but-not-ignored,
    so that build outputs, .venv and caches stay out of the build."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode()
    paths = [repo / name for name in listed.split("\0") if name]
    return [p for p in paths if p.is_file()]  # tracked files deleted in the work tree


def copy_source_tree(repo: Path, dest: Path) -> None:
    if (repo / ".git").exists() and shutil.which("git"):
        for path in source_files(repo):
            target = dest / path.relative_to(repo)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return
    # Not a git checkout (e.g. an unpacked sdist): the files the build reads.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ["pyproject.toml", "README.md"]:
        if (repo / name).exists():
            shutil.copy2(repo / name, dest / name)
    for folder in SUBPACKAGES:
        shutil.copytree(repo / folder, dest / folder, ignore=ignore)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited with {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    return result


def make_overlay_venv(venv: Path, env: dict[str, str]) -> Path:
    """A venv whose own site-packages comes first and this environment's after it.

    `venv --system-site-packages` made from a venv's python sees the base
    interpreter's packages, not the venv's, so a .pth file appends this
    environment's site-packages instead. Paths named in a .pth file are added
    after the venv's own site-packages, and .pth files found there are not
    processed, so the editable install's import hook stays out and the wheel's
    files win."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = venv / "bin" / "python"
    own_site = Path(run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env,
    ).stdout.strip())
    here = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (own_site / "_parent_env.pth").write_text("".join(f"{p}\n" for p in here))
    return python


def test_wheel_installs_imports_and_runs_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # Build the wheel from a copy, so the repository gets no build/ or *.egg-info.
    src, dist = tmp_path / "src", tmp_path / "dist"
    src.mkdir()
    copy_source_tree(REPO, src)
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
         "--outdir", str(dist), str(src)], env=env, cwd=tmp_path)
    (wheel,) = dist.glob("vocalign-*.whl")

    # Everything is under vocalign/ (nothing called `data` or `model` at the top
    # of site-packages), and the recipes are inside.
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/", 1)[0] for name in names} == {"vocalign", dist_info}
    for sub in SUBPACKAGES:
        assert f"vocalign/{sub}/__init__.py" in names
    recipes = sorted(p.name for p in (src / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ has no *.yaml recipe to package"
    packaged = sorted(n.rsplit("/", 1)[1] for n in names
                      if n.startswith("vocalign/recipes/") and n.endswith(".yaml"))
    assert packaged == recipes
    # the embedded recognizer's weights ship with the rewards
    assert {"vocalign/rewards/assets/ctc_asr.safetensors", "vocalign/rewards/assets/ctc_asr.json"} <= set(names)

    venv = tmp_path / "venv"
    python = make_overlay_venv(venv, env)
    # pip comes from this environment through the .pth file; --ignore-installed
    # so that it never touches this environment's own (editable) vocalign.
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
         "--ignore-installed", "--no-warn-script-location", "-q", str(wheel)], env=env)

    # Every subpackage imports, from the wheel's files in the new venv, and the
    # recipes are readable as package resources.
    check = (
        "import importlib, importlib.resources\n"
        f"for sub in {SUBPACKAGES!r}:\n"
        "    print(importlib.import_module('vocalign.' + sub).__file__)\n"
        "for r in sorted(importlib.resources.files('vocalign.recipes').iterdir(), key=str):\n"
        "    if r.name.endswith('.yaml'):\n"
        "        assert r.read_text(), r\n"
        "        print(r)\n"
    )
    lines = run([str(python), "-c", check], env=env, cwd=tmp_path).stdout.splitlines()
    module_files = [Path(line).resolve() for line in lines[:len(SUBPACKAGES)]]
    recipe_files = [Path(line).resolve() for line in lines[len(SUBPACKAGES):]]
    for module_file in module_files:
        assert module_file.is_relative_to(venv.resolve()), module_file
    assert sorted(p.name for p in recipe_files) == recipes
    assert all(p.is_relative_to(venv.resolve()) for p in recipe_files), recipe_files

    # The recognizer loads from the wheel's own files and hears a clip.
    asr = (
        "import numpy as np\n"
        "from vocalign.rewards.asr import get_asr\n"
        "from vocalign.rewards.ctc_asr import ASSETS\n"
        "from vocalign.model.detokenizer import EspeakUnitDetokenizer\n"
        "d = EspeakUnitDetokenizer()\n"
        "print(ASSETS)\n"
        "print(get_asr('embedded').transcribe([d.render(d.encode('seven')).waveform], 16000)[0])\n"
    )
    assets, heard = run([str(python), "-c", asr], env=env, cwd=tmp_path).stdout.splitlines()[-2:]
    assert Path(assets).resolve().is_relative_to(venv.resolve()) and heard == "seven"

    # The console script the wheel installed runs.
    result = run([str(venv / "bin" / "vocalign"), "--help"], env=env, cwd=tmp_path)
    assert "train" in result.stdout
