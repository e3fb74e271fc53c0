"""Running suites on policies: greedy responses to the same prompts, scored and aggregated.

`evaluate_policy` scores one policy on prepared suites (the run loop calls it during
training); `evaluate_targets` loads each target in turn, scores it on the same prompts,
and returns a `Report` with every mean's bootstrap interval and the paired difference of
each target from the first.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from vocalign.data.types import Prompt
from vocalign.model.policy import GREEDY_TEMPERATURE, Policy, Sampling

from .stats import bootstrap_mean, paired_difference
from .suites import NO_REQUEST, SampleResult, Suite, Variation

MAX_NEW_TOKENS = 48  # per turn; a spoken answer of the embedded model takes ~30
BATCH = 64


@dataclass
class PreparedSuite:
    """A suite with its prompts, built once so that every target answers the same ones."""

    suite: Suite
    prompts: list[Prompt]
    source: str  # "synthetic (<variation>)" or the data file
    skipped: list[str] = field(default_factory=list)


def prepare_suites(
    suites: Sequence[Suite], n: int, seed: int, variation: Variation, data: dict[str, str] | None = None,
    on_bad_row: str = "raise",
) -> list[PreparedSuite]:
    """Each suite's prompts: `n` synthetic ones under `variation`, or the rows of `data[suite]`."""
    from .userdata import load_suite_data

    prepared = []
    for k, suite in enumerate(suites):
        if data and suite.name in data:
            prompts, skipped = load_suite_data(suite, data[suite.name], on_bad_row)
            if n and len(prompts) > n:
                prompts = prompts[:n]
            prepared.append(PreparedSuite(suite, prompts, data[suite.name], skipped))
        else:
            prompts = suite.build(n, seed + 104729 * (k + 1), variation)
            prepared.append(PreparedSuite(suite, prompts, f"synthetic ({variation.label()})"))
        if not prepared[-1].prompts:
            raise ValueError(f"suite {suite.name}: no prompts to evaluate ({prepared[-1].source})")
    return prepared


def evaluate_policy(
    policy: Policy, prepared: Sequence[PreparedSuite], max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = False,
    desc: str = "eval",
) -> dict[str, list[SampleResult]]:
    """Greedy responses of `policy` to every prepared suite's prompts, scored: {suite: per-prompt results}."""
    from vocalign.rollouts.worker import RolloutWorker

    sampling = Sampling(GREEDY_TEMPERATURE, 1.0, max_new_tokens)
    total = sum(len(p.prompts) for p in prepared)
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    out: dict[str, list[SampleResult]] = {}
    was_training = policy.model.training
    policy.model.eval()
    try:
        for p in prepared:
            worker = RolloutWorker(policy, render_speech=bool(p.suite.speech_metrics), tools=p.suite.tools,
                                   max_turns=2)
            rollouts = []
            for i in range(0, len(p.prompts), BATCH):
                rollouts += worker.generate(p.prompts[i : i + BATCH], 1, sampling, seed=0)
                bar.update(len(p.prompts[i : i + BATCH]))
            results = p.suite.score(rollouts)
            if policy.detokenizer is None:  # it cannot speak: its speech metrics are not measured, not 0
                for r in results:
                    r.metrics.update({m: None for m in p.suite.speech_metrics})
            out[p.suite.name] = results
    finally:
        policy.model.train(was_training)
        bar.close()
    return out


def summarise(results: Sequence[SampleResult], metrics: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Each metric's mean with its interval, overall and per group, and the confusion of detected styles."""
    out: dict[str, Any] = {"n": len(results), "metrics": {}, "groups": {}}
    for m in metrics:
        out["metrics"][m] = bootstrap_mean([r.metrics.get(m) for r in results], seed=seed).as_dict()
    groups = sorted({r.group for r in results if r.group is not None}, key=_group_order)
    for g in groups:
        members = [r for r in results if r.group == g]
        out["groups"][g] = {m: bootstrap_mean([r.metrics.get(m) for r in members], seed=seed).as_dict() for m in metrics}
    confusion = _confusion(results)
    if confusion:
        out["confusion"] = confusion
    return out


def _group_order(group: str) -> tuple[int, str]:
    from .suites import STYLE_VALUES

    return (STYLE_VALUES.index(group), group) if group in STYLE_VALUES else (len(STYLE_VALUES) + (group == NO_REQUEST), group)


def _confusion(results: Sequence[SampleResult]) -> dict[str, dict[str, int]]:
    """requested value -> {detected level: count}; a prompt with no request counts under "none/<attribute>"."""
    table: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        requested, detected = r.detail.get("requested"), r.detail.get("detected")
        if requested is None or detected is None:
            continue
        if not requested:
            for attribute, level in detected.items():
                table[f"{NO_REQUEST}/{attribute}"][level] += 1
        for attribute, level in requested.items():
            table[level][detected.get(attribute, "no speech")] += 1
    return {k: dict(v) for k, v in sorted(table.items(), key=lambda kv: _group_order(kv[0]))}


@dataclass
class Report:
    """Everything `vocalign eval` writes: per suite, per target, the summaries and paired differences."""

    targets: list[str]
    variation: str
    suites: dict[str, dict[str, Any]]
    samples: dict[str, dict[str, list[SampleResult]]]  # target -> suite -> results

    def as_dict(self) -> dict[str, Any]:
        return {"targets": self.targets, "variation": self.variation, "suites": self.suites}


def build_report(
    labels: Sequence[str], prepared: Sequence[PreparedSuite], scored: dict[str, dict[str, list[SampleResult]]],
    variation: Variation, seed: int = 0,
) -> Report:
    suites: dict[str, dict[str, Any]] = {}
    for p in prepared:
        s = p.suite
        entry: dict[str, Any] = {"description": s.description, "source": p.source, "n": len(p.prompts),
                                 "metrics": list(s.metrics), "group_name": s.group_name, "skipped_rows": p.skipped,
                                 "targets": {}, "differences": {}}
        for label in labels:
            entry["targets"][label] = summarise(scored[label][s.name], s.metrics, seed)
        base = labels[0]
        for label in labels[1:]:
            entry["differences"][f"{label} - {base}"] = _differences(scored[base][s.name], scored[label][s.name], s, seed)
        suites[s.name] = entry
    return Report(list(labels), variation.label(), suites, scored)


def _differences(a: list[SampleResult], b: list[SampleResult], suite: Suite, seed: int) -> dict[str, Any]:
    """Paired differences b - a per metric, overall and per group (the same prompts, in the same order)."""
    assert [r.prompt_id for r in a] == [r.prompt_id for r in b], "targets must be scored on the same prompts"
    out: dict[str, Any] = {"metrics": {}, "groups": {}}
    for m in suite.metrics:
        out["metrics"][m] = paired_difference([r.metrics.get(m) for r in a], [r.metrics.get(m) for r in b], seed=seed).as_dict()
    for g in sorted({r.group for r in a if r.group is not None}, key=_group_order):
        rows = [(x, y) for x, y in zip(a, b) if x.group == g]
        out["groups"][g] = {m: paired_difference([x.metrics.get(m) for x, _ in rows], [y.metrics.get(m) for _, y in rows],
                                                 seed=seed).as_dict() for m in suite.metrics}
    return out


def evaluate_targets(
    targets, suites: Sequence[Suite], *, n: int, seed: int = 0, variation: Variation = Variation(),
    data: dict[str, str] | None = None, on_bad_row: str = "raise", max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True, say=print,
) -> Report:
    """Load each target in turn and score it on the same prompts; see `Report`."""
    prepared = prepare_suites(suites, n, seed, variation, data, on_bad_row)
    for p in prepared:
        say(f"{p.suite.name}: {len(p.prompts)} prompts, {p.source}" + (f", {len(p.skipped)} rows skipped" if p.skipped else ""))
        for reason in p.skipped:
            say(f"  skipped: {reason}")
    scored: dict[str, dict[str, list[SampleResult]]] = {}
    for target in targets:
        policy = target.load()
        scored[target.label] = evaluate_policy(policy, prepared, max_new_tokens, progress, desc=target.label)
        say(f"{target.label}: " + "; ".join(
            f"{p.suite.name} {p.suite.metrics[0]} "
            f"{bootstrap_mean([r.metrics.get(p.suite.metrics[0]) for r in scored[target.label][p.suite.name]]).show()}"
            for p in prepared))
    return build_report([t.label for t in targets], prepared, scored, variation, seed)
