"""Writing an evaluation: eval.json, eval.md (targets side by side) and plots.

    eval.json          every summary: per suite, per target, each metric's mean, its 95%
                       bootstrap interval and n, per group too; paired differences from
                       the first target; the style confusion tables
    eval.md            the same as Markdown tables
    samples.jsonl      one row per prompt and target: its metrics, group and details
    style.png          the style suite: how often each requested value is honoured, per target
    overview.png       every suite's metrics per target, with their intervals
    distributions.png  per-prompt values of the metrics that are not 0/1 (e.g. transcription accuracy)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .run import Report
from .stats import Estimate

FILES = ("eval.json", "eval.md", "samples.jsonl", "overview.png")


def write_report(report: Report, out: str | Path) -> list[Path]:
    """Write the report's files into `out` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "eval.md", out / "samples.jsonl"]
    written[0].write_text(json.dumps(report.as_dict(), indent=2, default=_plain) + "\n")
    written[1].write_text(markdown(report))
    with open(written[2], "w") as f:
        for target, suites in report.samples.items():
            for suite, results in suites.items():
                for r in results:
                    f.write(json.dumps({"target": target, "suite": suite, "prompt_id": r.prompt_id, "group": r.group,
                                        "metrics": r.metrics, "detail": r.detail}, default=_plain) + "\n")
    written += _plots(report, out)
    return written


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _show(d: dict[str, Any]) -> str:
    return Estimate(**d).show()


def _signed(d: dict[str, Any]) -> str:
    e = Estimate(**d)
    if e.n == 0:
        return "n/a"
    return f"{e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def markdown(report: Report) -> str:
    """Tables of every suite: targets side by side, then differences from the first target."""
    lines = [f"# Evaluation ({report.variation})", "",
             "Means over prompts with 95% bootstrap intervals; differences are paired over the same prompts.", ""]
    base = report.targets[0]
    for name, s in report.suites.items():
        lines += [f"## {name}", "", f"{s['description']}. {s['n']} prompts, {s['source']}.", ""]
        header = ["metric", *report.targets] + [f"{t} - {base}" for t in report.targets[1:]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in s["metrics"]:
            row = [m] + [_show(s["targets"][t]["metrics"][m]) for t in report.targets]
            row += [_signed(s["differences"][f"{t} - {base}"]["metrics"][m]) for t in report.targets[1:]]
            lines.append("| " + " | ".join(row) + " |")
        groups = list(s["targets"][base]["groups"])
        if groups:
            m = s["metrics"][0]
            lines += ["", f"{m} by {s['group_name'] or 'group'} (`neutral` for prompts with no request):", ""]
            header = [s["group_name"] or "group", "n", *report.targets] + [f"{t} - {base}" for t in report.targets[1:]]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for g in groups:
                shown = m if s["targets"][base]["groups"][g][m]["n"] else next(
                    (k for k in s["metrics"] if s["targets"][base]["groups"][g][k]["n"]), m)
                row = [g if shown == m else f"{g} ({shown})", str(s["targets"][base]["groups"][g][shown]["n"])]
                row += [_show(s["targets"][t]["groups"][g][shown]) for t in report.targets]
                row += [_signed(s["differences"][f"{t} - {base}"]["groups"][g][shown]) for t in report.targets[1:]]
                lines.append("| " + " | ".join(row) + " |")
        for t in report.targets:
            confusion = s["targets"][t].get("confusion")
            if confusion:
                levels = sorted({lvl for row in confusion.values() for lvl in row}, key=_level_order)
                lines += ["", f"Detected level by requested value, {t} (counts):", "",
                          "| requested | " + " | ".join(levels) + " |", "|" + "---|" * (len(levels) + 1)]
                for req, row in confusion.items():
                    lines.append(f"| {req} | " + " | ".join(str(row.get(lvl, 0)) for lvl in levels) + " |")
        if s["skipped_rows"]:
            lines += ["", f"{len(s['skipped_rows'])} rows skipped:", *[f"- {r}" for r in s["skipped_rows"]]]
        lines.append("")
    return "\n".join(lines)


_LEVEL_ORDER = ("slow", "low", "soft", "normal", "fast", "high", "loud", "no speech")


def _level_order(level: str) -> tuple[int, str]:
    return (_LEVEL_ORDER.index(level) if level in _LEVEL_ORDER else len(_LEVEL_ORDER), level)


def _plots(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    width = 0.8 / len(report.targets)
    # every suite's metrics, per target, with intervals
    names = [(suite, m) for suite, s in report.suites.items() for m in s["metrics"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    for k, t in enumerate(report.targets):
        est = [Estimate(**report.suites[suite]["targets"][t]["metrics"][m]) for suite, m in names]
        x = np.arange(len(names)) + (k - (len(report.targets) - 1) / 2) * width
        _bars(ax, x, est, width, t)
    ax.set_xticks(np.arange(len(names)), [f"{suite}\n{m}" for suite, m in names], fontsize=8)
    written.append(_save(fig, ax, out / "overview.png", "mean over prompts (95% CI)", f"vocalign eval ({report.variation})"))

    style = report.suites.get("style")
    if style:
        base = report.targets[0]
        groups = list(style["targets"][base]["groups"])
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4))
        for k, t in enumerate(report.targets):
            est = []
            for g in groups:
                summary = style["targets"][t]["groups"][g]
                est.append(Estimate(**(summary["honoured"] if summary["honoured"]["n"] else summary["neutral"])))
            x = np.arange(len(groups)) + (k - (len(report.targets) - 1) / 2) * width
            _bars(ax, x, est, width, t)
        ax.set_xticks(np.arange(len(groups)), [g if g != "none" else "none\n(all neutral)" for g in groups])
        ax.set_ylim(0, 1.05)
        ax.axhline(0.8, color="grey", lw=0.8, ls="--")
        written.append(_save(fig, ax, out / "style.png", "share honoured (95% CI)",
                             f"requested speaking style, greedy ({report.variation})"))

    continuous = [(suite, m) for suite, s in report.suites.items() for m in s["metrics"]
                  if any(v is not None and v not in (0.0, 1.0) for res in report.samples.values()
                         for v in (r.metrics.get(m) for r in res.get(suite, [])))]
    if continuous:
        fig, axes = plt.subplots(1, len(continuous), figsize=(4 * len(continuous), 3.2), squeeze=False)
        for ax, (suite, m) in zip(axes[0], continuous):
            for t in report.targets:
                values = [r.metrics[m] for r in report.samples[t][suite] if r.metrics.get(m) is not None]
                ax.hist(values, bins=20, alpha=0.5, label=t)
            ax.set_title(f"{suite}: {m}", fontsize=9)
            ax.set_xlabel("per-prompt value")
        axes[0][0].set_ylabel("prompts")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "distributions.png", dpi=110)
        plt.close(fig)
        written.append(out / "distributions.png")
    return written


def _save(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, x, estimates, width, label) -> None:
    means = [e.mean if e.n else math.nan for e in estimates]
    lows = [e.mean - e.low if e.n else 0 for e in estimates]
    highs = [e.high - e.mean if e.n else 0 for e in estimates]
    ax.bar(x, means, width, yerr=[lows, highs], capsize=3, label=label)
