"""Run folders are never reused by accident.

A new run needs a folder that does not exist, is empty, or holds only a run that failed
before its first checkpoint (marked by `failed.txt`). A folder holding another run's
files is refused, unless the run resumes it (`run.resume=true`, and then it must hold a
checkpoint) or `--force` is given (the previous run's files are removed first; files
that no run writes are left alone). A run that fails before its first checkpoint writes
`failed.txt` with the error, so its logs stay readable and the next run may reuse the
folder; one that fails before it has trained a step leaves nothing behind, except the
folder itself when it existed before.
"""

from __future__ import annotations

import shutil
import traceback
from datetime import datetime
from pathlib import Path

from .checkpoint import CheckpointError, checkpoints, intact_checkpoint

FAILED_MARKER = "failed.txt"
# What runs write into their folder (policy and reward-model runs); only these are removed by --force.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "samples.jsonl", "reward_curve.png", "checkpoints",
             "wandb", "reward_model", FAILED_MARKER)


class RunFolderError(ValueError):
    """The run folder cannot be used as asked: the message says why and what to do."""


def new_run_folder(output_dir: str | None, name: str) -> Path:
    """`run.output_dir` when set, else runs/<name>-<date-time>."""
    if output_dir:
        return Path(output_dir)
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_files(run_dir: Path) -> list[str]:
    """The names in `run_dir` that a run writes."""
    return sorted(name for name in RUN_FILES if (Path(run_dir) / name).exists())


def claim(run_dir: Path, resume: bool, force: bool) -> Path | None:
    """Check `run_dir` for a run and prepare it; returns the checkpoint to resume from (None: start afresh).

    Raises RunFolderError, with nothing changed on disk, when the folder may not be used.
    """
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.is_dir():
            raise RunFolderError(f"run.resume=true but run.output_dir={run_dir} does not exist; give the folder of "
                                 f"the run to continue (its name is printed at its start), or leave run.resume out")
        try:
            latest = intact_checkpoint(run_dir)
        except CheckpointError as e:
            raise RunFolderError(str(e)) from None
        if latest is None:
            raise RunFolderError(f"run.resume=true but {run_dir} holds no checkpoint to continue from; start a new "
                                 f"run without run.resume (add --force to reuse this folder)")
        return latest
    found = run_files(run_dir) if run_dir.is_dir() else []
    if not found:
        return None
    failed_early = (run_dir / FAILED_MARKER).exists() and not checkpoints(run_dir / "checkpoints")
    if not (force or failed_early):
        raise RunFolderError(
            f"run.output_dir={run_dir} already holds a run ({', '.join(found)}); pass run.resume=true to continue it, "
            f"choose another run.output_dir, or add --force to replace that run's files"
        )
    for name in found:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def mark_failed(run_dir: Path, existed: bool, trained: bool, error: BaseException) -> None:
    """After a failed run: nothing left if it trained no step, else `failed.txt` while it has no checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or checkpoints(run_dir / "checkpoints"):
        return  # a checkpoint is there: the run can be resumed
    if not trained:
        for name in run_files(run_dir):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not existed and not any(run_dir.iterdir()):
            run_dir.rmdir()
        return
    (run_dir / FAILED_MARKER).write_text(
        "This run failed before its first checkpoint; the next run may reuse this folder.\n\n"
        + "".join(traceback.format_exception_only(type(error), error))
    )
