"""What a run evaluates after each stage: greedy held-out rewards, the recipe's `eval.suites`
(logged as `eval/<suite>/...`) and the summary of a stage's reward curve."""

from __future__ import annotations

import contextlib

import numpy as np

from vocalign.data.types import Prompt
from vocalign.model.policy import GREEDY_TEMPERATURE, Policy, Sampling
from vocalign.rewards import score
from vocalign.rewards.workers import RewardWorkers
from vocalign.rollouts.contract import RolloutSource

from .config import Recipe
from .tracking import RunTracker, reward_components


def evaluate(
    worker: RolloutSource, prompts: list[Prompt], recipe: Recipe, reward_workers: RewardWorkers | None = None,
    batch_size: int = 64, gather=contextlib.nullcontext,
) -> dict[str, float]:
    """Greedy responses to held-out prompts, scored by the recipe's rewards."""
    sampling = Sampling(GREEDY_TEMPERATURE, 1.0, recipe.rl.max_new_tokens)
    rollouts = []
    with gather():
        for i in range(0, len(prompts), batch_size):
            rollouts += worker.generate(prompts[i : i + batch_size], 1, sampling, seed=0)
    return score(rollouts, recipe.rewards, reward_workers).metrics()


def eval_suites(recipe: Recipe) -> list:
    """The recipe's `eval.suites` with their held-out prompts (seeds apart from training and from
    `data.eval_prompts`), built once so that every evaluation of the run answers the same prompts."""
    if not recipe.eval.suites:
        return []
    from .evaluation import Variation, get_suite, prepare_suites

    variation = Variation.parse([f"{k}={v}" for k, v in recipe.eval.variation.items()])
    return prepare_suites([get_suite(name) for name in recipe.eval.suites], recipe.eval.n, recipe.data.seed + 3, variation)


def run_eval_suites(policy: Policy, prepared: list, recipe: Recipe, tracker: RunTracker, step: int,
                    gather=contextlib.nullcontext) -> dict:
    """Score `policy` on the prepared suites; log `eval/<suite>/<metric>` (and per group) at `step`.

    Returns {suite: summary} (means with 95% bootstrap intervals, see `vocalign.rl.evaluation.summarise`).
    """
    if not prepared:
        return {}
    from .evaluation import evaluate_policy, summarise

    with gather():
        results = evaluate_policy(policy, prepared, recipe.rl.max_new_tokens)
    summaries = {p.suite.name: summarise(results[p.suite.name], p.suite.metrics) for p in prepared}
    row: dict[str, float | str] = {"stage": "eval"}
    for suite, summary in summaries.items():
        for metric, estimate in summary["metrics"].items():
            row[f"eval/{suite}/{metric}"] = estimate["mean"]
        for group, metrics in summary["groups"].items():
            for metric, estimate in metrics.items():
                if estimate["n"]:
                    row[f"eval/{suite}/{group}/{metric}"] = estimate["mean"]
    tracker.log(row, step=step)
    return summaries


def style_table(summaries: dict) -> dict[str, float] | None:
    """The style suite's share honoured per requested value, and the neutral share of prompts asking for none."""
    style = summaries.get("style")
    if not style:
        return None
    table = {}
    for group, metrics in style["groups"].items():
        key, metric = ("none (neutral)", "neutral") if group == "none" else (group, "honoured")
        if metrics[metric]["n"]:
            table[key] = metrics[metric]["mean"]
    return table


def show_style(table: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in table.items()) if table else ""


_ENDS = {"first 10%": (0.0, 0.1), "last 10%": (0.9, 1.0)}


def _mean_of(rows: list[dict], key: str, lo: float, hi: float) -> float:
    """The mean of rows[key] over the steps from fraction `lo` to `hi` of the stage (NaN-free values only)."""
    part = rows[int(lo * len(rows)) : max(int(lo * len(rows)) + 1, int(hi * len(rows)))]
    values = [r[key] for r in part if not np.isnan(r[key])]
    return float(np.mean(values)) if values else float("nan")


def rl_summary(rows: list[dict], evaluation: dict[str, float], keys: list[str] | None = None) -> dict:
    """The total and each reward component (or `keys`) over the first and the last 10% of a
    stage's steps, and the evaluation."""
    keys = reward_components(rows) if keys is None else keys
    return {**{f"{k} {part}": _mean_of(rows, k, *span) for k in keys for part, span in _ENDS.items()}, "eval": evaluation}


def stage_table(summary: dict, stages: list[tuple[str, str]]) -> list[dict]:
    """Per stage of a staged run: its own measure over its steps (RL: reward/mean; a reward
    model: its training accuracy; first vs last 10%), and every eval-suite metric (overall
    and per group) before and after it, with 95% intervals. `lost` marks a metric whose
    mean after the stage is below its interval before (lost by more than its interval)."""
    table, before = [], summary.get("initial_suites") or {}
    for name, kind in stages:
        done = summary.get(name) or {}
        after = summary.get(f"{name}_suites") or before  # a reward-model stage leaves the policy as it was
        key = "reward_model/accuracy" if kind == "reward_model" else "reward/mean"
        own = None
        if f"{key} first 10%" in done:
            own = {"metric": key, "first": done[f"{key} first 10%"], "last": done[f"{key} last 10%"]}
        row = {"name": name, "type": kind, "own": own, "suites": []}
        if kind == "reward_model" and "held_out" in done:
            row["held_out"] = done["held_out"]
        if f"{name}_before" in summary and "eval" in done:  # its own rewards, greedy on held-out prompts
            row["own_held_out"] = {"before": summary[f"{name}_before"], "after": done["eval"]}
        for suite, result in after.items():
            old = before.get(suite)
            if old is None:
                continue
            pairs = [(m, result["metrics"][m], old["metrics"].get(m)) for m in result["metrics"]]
            pairs += [(f"{g}/{m}", e, old["groups"].get(g, {}).get(m)) for g, ms in result["groups"].items()
                      for m, e in ms.items()]
            for metric, now, then in pairs:
                if then is None or not now["n"] or not then["n"]:
                    continue
                row["suites"].append({"metric": f"{suite}/{metric}", "before": then, "after": now,
                                      "lost": now["mean"] < then["low"]})
        table.append(row)
        before = after
    return table


def stage_lines(table: list[dict]) -> list[str]:
    """The console's per-stage summary: its own reward over its steps, and each suite metric before -> after."""
    lines = []
    for row in table:
        own = row.get("own")
        text = f"stage {row['name']} ({row['type']})"
        if own:
            text += f": {own['metric']} {own['first']:.3f} -> {own['last']:.3f} (first -> last 10% of its steps)"
        if "held_out" in row:
            text += "; held-out pairwise accuracy " + ", ".join(
                f"{k.split('/')[1]} {v:.2f}" for k, v in row["held_out"].items() if "/" in k)
        changes = [f"{c['metric']} {c['before']['mean']:.2f} -> {c['after']['mean']:.2f} "
                   f"[{c['after']['low']:.2f}, {c['after']['high']:.2f}]" + (" (lost)" if c["lost"] else "")
                   for c in row.get("suites", []) if c["metric"].count("/") == 1]  # overall; per group in summary.json
        if changes and row["type"] != "reward_model":
            text += "; held out: " + ", ".join(changes)
        lines.append(text)
    return lines
