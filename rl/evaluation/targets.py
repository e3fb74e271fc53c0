"""What `vocalign eval` can evaluate: a run, a checkpoint, a model folder, or the embedded base.

A TARGET argument is one of:
- `embedded`: the embedded model as built before any training (seed 0);
- a run folder (`runs/demo-...`, it holds `checkpoints/`): its newest checkpoint;
- a checkpoint folder (`RUN/checkpoints/step-N`): its policy, the adapter applied to its base;
- a model folder: a run's `checkpoints/base` (for a LoRA run, the weights RL started
  from: the SFT model), a folder written by `vocalign export`, or a local Qwen2-Audio checkpoint.

`NAME=TARGET` gives it the name the tables and plots use; the default is short and
unique (the last path parts that tell the targets apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vocalign.model.policy import Policy

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Target:
    label: str
    source: str  # "embedded" or a folder
    kind: str  # embedded | run | checkpoint | model

    def load(self) -> Policy:
        from vocalign.model.loading import embedded_policy, load_policy

        from ..checkpoint import latest_checkpoint, load_checkpoint

        if self.kind == EMBEDDED:
            return embedded_policy(0)
        if self.kind == "run":
            return load_checkpoint(latest_checkpoint(Path(self.source)))
        if self.kind == "checkpoint":
            return load_checkpoint(self.source)
        return load_policy(self.source)


def resolve_target(spec: str) -> tuple[str | None, str, str]:
    """(name or None, source, kind) of one TARGET argument; a clear error for one that is not there."""
    from ..checkpoint import STATE_NAME, latest_checkpoint

    name, eq, rest = spec.partition("=")
    if not eq or "/" in name:
        name, rest = None, spec
    if rest == EMBEDDED:
        return name, rest, EMBEDDED
    path = Path(rest)
    if not path.exists():
        raise FileNotFoundError(
            f"eval target {rest!r} does not exist; give a run folder, RUN/checkpoints/step-N, a model folder "
            f"(RUN/checkpoints/base, an exported model) or 'embedded'"
        )
    if (path / STATE_NAME).exists():
        return name, str(path), "checkpoint"
    if (path / "checkpoints").is_dir():
        if latest_checkpoint(path) is None:
            raise ValueError(f"eval target {rest!r} is a run folder without a checkpoint yet; give one of its model "
                             f"folders (e.g. {path / 'checkpoints' / 'base'}) or wait for its first save")
        return name, str(path), "run"
    if any((path / f).exists() for f in ("vocalign_config.json", "config.json")):
        return name, str(path), "model"
    raise ValueError(f"eval target {rest!r} is not a run, a checkpoint or a model folder (it has no checkpoints/, "
                     f"{STATE_NAME}, vocalign_config.json or config.json)")


def resolve_targets(specs: Sequence[str]) -> list[Target]:
    """Targets with unique labels, in the order given."""
    if not specs:
        raise ValueError("give at least one eval target")
    resolved = [resolve_target(s) for s in specs]
    unnamed = [source for name, source, _ in resolved if name is None]
    labels = iter(_short_labels(unnamed) if unnamed else [])
    targets = [Target(name or next(labels), source, kind) for name, source, kind in resolved]
    seen = [t.label for t in targets]
    clash = sorted({x for x in seen if seen.count(x) > 1})
    if clash:
        raise ValueError(f"eval targets {clash} are named twice; give each a name with NAME=TARGET")
    return targets


def _short_labels(sources: Sequence[str]) -> list[str]:
    """For each source, its last path parts, as few as tell it apart from the others."""
    parts = [Path(s).parts if s != EMBEDDED else (EMBEDDED,) for s in sources]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(sources)
