"""Draw the RL reward curves of several runs side by side, one panel per reward key.

    python bench/plot_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each run's `metrics.jsonl` is read; its RL steps are drawn as thin lines with a moving
average over 7 steps on top, for the total and every reward component.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vocalign.rl.tracking import moving_average, read_metrics, reward_components  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    out, runs = Path(argv[0]), [a.split("=", 1) for a in argv[1:]]
    series = {label: [r for r in read_metrics(Path(d) / "metrics.jsonl") if r.get("stage") == "rl"] for label, d in runs}
    # (runs from before the trained batch's reward was renamed batch/reward_mean logged it as reward/trained_mean)
    keys = ["reward/mean"] + [k for k in reward_components(next(iter(series.values()))) if k not in ("reward/mean", "reward/trained_mean")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in series.items():
            x = list(range(1, len(rows) + 1))
            y = [r[key] for r in rows]
            line = ax.plot(x, y, alpha=0.25, linewidth=1)[0]
            ax.plot(x, moving_average(y, 7), color=line.get_color(), linewidth=2, label=label)
        ax.set_title(key.removeprefix("reward/"))
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward (sampled, per step)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
