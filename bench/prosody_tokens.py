"""Which prosody token the policy samples, per requested style, at every RL step of a recipe.

A diagnostic for style rewards on the embedded model: the paralinguistic reward's mean
can rise while one requested value is never honoured. This runs a recipe (any overrides
as for `vocalign train`) and records, for each RL step, how often the sampled responses
to each requested value (slow, fast, low, high, soft, loud; "none" for no request) chose
the matching prosody token, e.g.

    python bench/prosody_tokens.py demo --out runs/tokens rl.steps=70
    python bench/prosody_tokens.py demo --out runs/no-demos 'data.sft_tasks[1].n=0'

It prints a table every 10 steps and writes prosody_tokens.jsonl (one row per step) and
prosody_tokens.png into the run folder.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from vocalign.model.detokenizer import UNITS
from vocalign.rl import runner, trainer
from vocalign.rl.config import Recipe
from vocalign.rl.recipe import load_recipe, resolve_recipe_path

ATTRIBUTES = {"rate": ("slow", "normal", "fast"), "pitch": ("low", "normal", "high"), "volume": ("soft", "normal", "loud")}
PROSODY = {UNITS.index(f"<{a}_{level}>"): (a, level) for a, levels in ATTRIBUTES.items() for level in levels}
VALUES = ("slow", "fast", "low", "high", "soft", "loud", "none")


def chosen(audio_tokens: list[int], offset: int = 0) -> dict[str, str]:
    """The first prosody token of each attribute in a response's audio units."""
    got: dict[str, str] = {}
    for token in audio_tokens:
        unit = PROSODY.get(token - offset)
        if unit and unit[0] not in got:
            got[unit[0]] = unit[1]
    return got


def step_row(step: int, rollouts) -> dict:
    """For each requested value, the share of samples whose token matches (none: all three normal)."""
    hits: dict[str, Counter] = defaultdict(Counter)
    for r in rollouts:
        style = r.meta.get("style")
        if style is None:
            continue
        got = chosen(r.audio_tokens)
        if not style:
            hits["none"][all(got.get(a) == "normal" for a in ATTRIBUTES)] += 1
        for attribute, level in style.items():
            hits[level][got.get(attribute) == level] += 1
    return {"step": step, **{v: hits[v][True] / sum(hits[v].values()) for v in VALUES if hits[v]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args()
    path = resolve_recipe_path(args.recipe)
    recipe = load_recipe(path, [*args.overrides, f"run.output_dir={args.out}", "run.progress=false"], Recipe)
    rows: list[dict] = []
    step = trainer.RLTrainer.step

    def recording_step(self, cursor, i):
        metrics, rollouts = step(self, cursor, i)
        rows.append(step_row(i + 1, rollouts))
        if (i + 1) % 10 == 0:
            window = rows[-10:]
            print(f"steps {i - 8:3d}-{i + 1:3d}: " + "  ".join(
                f"{v} {sum(r[v] for r in window if v in r) / max(1, sum(v in r for r in window)):.2f}"
                for v in VALUES), flush=True)
        return metrics, rollouts

    trainer.RLTrainer.step = recording_step
    run_dir = runner.train(recipe, path.stem)
    (Path(run_dir) / "prosody_tokens.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _plot(rows, Path(run_dir) / "prosody_tokens.png")


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vocalign.rl.tracking import moving_average

    fig, ax = plt.subplots(figsize=(7, 4))
    for v in VALUES:
        points = [(r["step"], r[v]) for r in rows if v in r]
        if points:
            ax.plot([s for s, _ in points], moving_average([x for _, x in points], 5), label=v)
    ax.set_xlabel("RL step")
    ax.set_ylabel("samples choosing the requested level (mean of 5 steps)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
