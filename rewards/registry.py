"""The reward API: register reward functions by name, and score rollouts with a list of them.

A reward function scores a batch of rollouts:

    @reward("brevity")
    def brevity(rollouts: list[Rollout], max_words: int = 20) -> list[float | None]:
        return [1.0 if len(r.text.split()) <= max_words else 0.0 for r in rollouts]

It returns one score per rollout, in order; `None` means "no score for this sample" (the
reward does not apply to it, e.g. a correctness check on a prompt without an answer). The
function may be `async def`; it is then run to completion with asyncio. Extra keyword
arguments are its parameters, set per recipe entry.

A recipe names rewards by their registered name or as `package.module:function` (any
plain function with that signature; no decorator needed), each with a weight, its params
and what to do when it raises (`RewardSpec`). `score` runs them and returns every
component, the weighted total and the failure counts (`RewardScores`).
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import math
import numbers
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from vocalign.common.registry import Registry, import_function
from vocalign.data.types import Rollout

RewardFn = Callable[..., Any]  # (rollouts, **params) -> list[float | None], or a coroutine of it

ON_ERROR = ("raise", "zero", "skip")

_REGISTRY: Registry[RewardFn] = Registry(
    "reward", "A reward decorated with @reward(name) in your own module registers only once that module is imported: "
    "name it as 'your_module:function' (the module beside your recipe, or importable)",
)


class RewardError(RuntimeError):
    """A reward function raised, or returned something other than one score per rollout."""


# --- registering and finding rewards -------------------------------------------------


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register the decorated function as the reward called `name`; the function is returned unchanged."""
    if ":" in name:
        raise ValueError(
            f"reward name {name!r} contains ':', which marks a 'package.module:function' reference; "
            "register it under a name without ':'"
        )

    def register(fn: RewardFn) -> RewardFn:
        _REGISTRY.add(name, fn, fn)
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    """The reward function called `name`: a registered name, or `package.module:function`."""
    return import_function(name, "reward") if ":" in name else _REGISTRY.get(name)


class RewardInfo(NamedTuple):
    """What `vocalign rewards` prints for one registered reward."""

    name: str
    doc: str  # the first line of the function's docstring
    params: dict[str, Any]  # parameter name -> default (REQUIRED when it has none)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def list_rewards() -> list[RewardInfo]:
    """Every registered reward, sorted by name, with its one-line description and params."""
    return [
        RewardInfo(name, _first_line(fn), {p.name: _default(p) for p in _params(fn)})
        for name, fn in _REGISTRY.items()
    ]


def _first_line(fn: RewardFn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _default(parameter: inspect.Parameter) -> Any:
    return REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default


def _params(fn: RewardFn) -> list[inspect.Parameter]:
    """The parameters a recipe may set: every named parameter after the rollouts."""
    named = [
        p for p in inspect.signature(fn).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return named[1:]


# --- scoring -------------------------------------------------------------------------


@dataclass
class RewardSpec:
    """One reward of a recipe: which function, its weight in the total, its params, and
    what a sample gets when the function raises on it: `raise` (stop the run), `zero`
    (score 0.0) or `skip` (no score, None)."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    on_error: str = "raise"
    # 0: score in this process. N >= 1: score in N Ray actors (replicas) that keep the
    # reward's models loaded; the batch is split between them (see vocalign.rewards.workers)
    workers: int = 0

    def __post_init__(self) -> None:
        _check_on_error(self)
        if not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name!r}: weight={self.weight!r} must be a finite number")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(
                f"reward {self.name!r}: workers={self.workers!r} must be 0 (score in-process) or the "
                "number of Ray actors to score in"
            )


@dataclass
class RewardScores:
    """The scores of one batch of rollouts.

    `components` maps each reward to its per-sample scores (None = no score). A reward
    named twice in the specs is keyed `name#1`, `name#2`, ... in order. `total[i]` is
    the weighted sum of sample i's scores that are not None; a None is left out and the
    other weights are NOT rescaled, so a missing score counts like 0 (as in TRL), and a
    sample with no scores at all totals 0.0. `failed` counts, per reward, the samples on
    which the function raised (scored 0.0 or None, by its `on_error`).
    """

    components: dict[str, list[float | None]]
    total: list[float]
    failed: dict[str, int]

    def metrics(self) -> dict[str, float]:
        """`reward/mean` (of the total) and per reward: `reward/<name>` (mean over its
        scores that are not None; NaN when there are none), `/std` (population std over
        the same), `/none_frac` and `/failed` (a count)."""
        out = {"reward/mean": _mean(self.total)}
        for name, scores in self.components.items():
            present = [s for s in scores if s is not None]
            out[f"reward/{name}"] = _mean(present)
            out[f"reward/{name}/std"] = float(np.std(present)) if present else math.nan
            out[f"reward/{name}/none_frac"] = (len(scores) - len(present)) / len(scores) if scores else math.nan
            out[f"reward/{name}/failed"] = float(self.failed.get(name, 0))
        return out


def score(rollouts: Sequence[Rollout], specs: Sequence[RewardSpec], workers: RemoteScorer | None = None) -> RewardScores:
    """Score `rollouts` with every reward of `specs`; see RewardScores for how they combine.

    Each reward is called once on the whole batch. Rewards with `workers > 0` are sent to
    `workers` (a `vocalign.rewards.workers.RewardWorkers`) first, so they run while the
    others run here; the `async` rewards here run concurrently with each other, after the
    plain ones.
    """
    if not specs:
        raise ValueError("no rewards to score with; give at least one RewardSpec (a recipe's `rewards` list)")
    rollouts = list(rollouts)
    # Resolve and check every spec before running any, so a typo fails before slow rewards run.
    functions = [get_reward(spec.name) for spec in specs]
    for spec, fn in zip(specs, functions):
        _check_spec(spec, fn)
    remote = [k for k, spec in enumerate(specs) if spec.workers > 0]
    if remote and workers is None:
        raise ValueError(
            f"reward {specs[remote[0]].name!r} asks for workers={specs[remote[0]].workers} but no reward workers "
            "were given; pass score(..., workers=RewardWorkers()) or set its workers to 0"
        )
    pending = {k: workers.submit(specs[k], rollouts) for k in remote} if remote else {}
    results: dict[int, tuple[list[float | None], int]] = {}
    coroutines = {}
    for k, (spec, fn) in enumerate(zip(specs, functions)):
        if k in pending:
            continue
        if inspect.iscoroutinefunction(fn):
            coroutines[k] = _run_async(spec, fn, rollouts)
        else:
            results[k] = _run(spec, fn, rollouts)
    if coroutines:
        results.update(zip(coroutines, _run_coroutines(list(coroutines.values()))))
    for k, handle in pending.items():
        results[k] = workers.result(handle)
    return _combine(specs, [results[k] for k in range(len(specs))], len(rollouts))


def _combine(specs: Sequence[RewardSpec], results: list[tuple[list[float | None], int]], n: int) -> RewardScores:
    counts = Counter(spec.name for spec in specs)
    seen: Counter[str] = Counter()
    components: dict[str, list[float | None]] = {}
    failed: dict[str, int] = {}
    total = [0.0] * n
    for spec, (scores, failures) in zip(specs, results):
        seen[spec.name] += 1
        key = spec.name if counts[spec.name] == 1 else f"{spec.name}#{seen[spec.name]}"
        components[key], failed[key] = scores, failures
        for i, value in enumerate(scores):
            if value is not None:
                total[i] += spec.weight * value
    return RewardScores(components=components, total=total, failed=failed)


class RemoteScorer(Protocol):
    """Where `score` sends the rewards that run elsewhere (see vocalign.rewards.workers)."""

    def submit(self, spec: RewardSpec, rollouts: list[Rollout]) -> Any: ...

    def result(self, handle: Any) -> tuple[list[float | None], int]: ...


def check_rewards(specs: Sequence[RewardSpec]) -> None:
    """Resolve every reward and check its params, without running any (fail before training)."""
    if not specs:
        raise ValueError("no rewards to score with; give at least one RewardSpec (a recipe's `rewards` list)")
    for spec in specs:
        _check_spec(spec, get_reward(spec.name))


def _check_spec(spec: RewardSpec, fn: RewardFn) -> None:
    _check_on_error(spec)  # again: a recipe may hold its own spec class with these fields
    params = _params(fn)
    accepted = {p.name for p in params}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    shown = ", ".join(f"{p.name}={_default(p)!r}" for p in params) or "no params"
    unknown = [name for name in spec.params if name not in accepted]
    if unknown and not takes_any:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, accepted, n=1)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise ValueError(f"reward {spec.name!r}: unknown params {', '.join(hints)}; it accepts: {shown}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in spec.params]
    if missing:
        raise ValueError(f"reward {spec.name!r}: params {', '.join(missing)} must be set; it accepts: {shown}")


def _check_on_error(spec: RewardSpec) -> None:
    if spec.on_error not in ON_ERROR:
        raise ValueError(
            f"reward {spec.name!r}: on_error={spec.on_error!r} is not known; use one of {', '.join(ON_ERROR)}"
        )


def _run(spec: RewardSpec, fn: RewardFn, rollouts: list[Rollout]) -> tuple[list[float | None], int]:
    """The scores of one plain reward and how many samples it failed on (see `_plan`).

    `_run_async` with a plain function never suspends: one send runs it to the end."""
    coroutine = _run_async(spec, fn, rollouts)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError(f"reward {spec.name!r}: a plain reward's scoring suspended; declare it `async def`")


async def _run_async(spec: RewardSpec, fn: RewardFn, rollouts: list[Rollout]) -> tuple[list[float | None], int]:
    """The scores of one reward (an `async` one awaited in the caller's event loop) and its failure count."""
    is_async = inspect.iscoroutinefunction(fn)
    plan = _plan(spec, rollouts)
    batch = next(plan)
    while True:
        try:
            outcome = await fn(batch, **spec.params) if is_async else _call(fn, batch, spec.params)
        except RewardError:
            raise
        except Exception as error:
            outcome = error
        try:
            batch = plan.send(outcome)
        except StopIteration as done:
            return done.value


def _plan(spec: RewardSpec, rollouts: list[Rollout]):
    """What to score, as a generator: it yields a batch and is sent the reward's result (or
    the exception it raised); its return value is (scores, failures).

    The whole batch comes first. When that call raises, each sample is scored alone to
    find the ones that fail: they get 0.0 or None (by on_error), the others keep their own
    score. Under `raise` the first failing sample is named in the error.
    """
    result = yield rollouts
    if not isinstance(result, Exception):
        return _checked(spec, result, len(rollouts)), 0
    outcomes: list[float | None | Exception] = []
    for rollout in rollouts:
        single = yield [rollout]
        outcomes.append(single if isinstance(single, Exception) else _checked(spec, single, 1)[0])
        if isinstance(single, Exception) and spec.on_error == "raise":
            break  # the first failing sample is the one the error names
    return _per_sample(spec, rollouts, outcomes, result)


def _per_sample(
    spec: RewardSpec, rollouts: list[Rollout], outcomes: list[float | None | Exception], batch_error: Exception
) -> tuple[list[float | None], int]:
    """Scores after the batch call failed and each sample was scored alone (`outcomes`)."""
    scores: list[float | None] = []
    failures = 0
    for rollout, outcome in zip(rollouts, outcomes):
        if not isinstance(outcome, Exception):
            scores.append(outcome)
            continue
        if spec.on_error == "raise":
            raise RewardError(
                f"reward {spec.name!r} failed on prompt {rollout.prompt.id!r}: "
                f"{type(outcome).__name__}: {outcome}; fix the reward, or set on_error to 'zero' or "
                "'skip' to score failing samples 0.0 or None"
            ) from outcome
        failures += 1
        scores.append(0.0 if spec.on_error == "zero" else None)
    if spec.on_error == "raise":
        ids = ", ".join(repr(r.prompt.id) for r in rollouts[:5]) + (", ..." if len(rollouts) > 5 else "")
        raise RewardError(
            f"reward {spec.name!r} failed on the batch of {len(rollouts)} rollouts (prompts {ids}) but on "
            f"none of them alone: {type(batch_error).__name__}: {batch_error}"
        ) from batch_error
    return scores, failures


def _call(fn: RewardFn, rollouts: list[Rollout], params: dict[str, Any]) -> Any:
    result = fn(rollouts, **params)
    if not inspect.isawaitable(result):
        return result
    return _run_coroutines([_awaited(result)])[0]


def _run_coroutines(coroutines: list[Any]) -> list[Any]:
    """Run coroutines concurrently to completion and return their results, in order."""

    async def together() -> list[Any]:
        return list(await asyncio.gather(*coroutines))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(together())
    # Called from inside a running event loop (a notebook, an async actor): run them on a fresh loop elsewhere.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, together()).result()


async def _awaited(result: Any) -> Any:
    return await result


def _checked(spec: RewardSpec, result: Any, expected: int) -> list[float | None]:
    """`result` as a list of floats/None, or a RewardError naming the reward and what is wrong."""
    if isinstance(result, (str, bytes, dict)) or not isinstance(result, (Sequence, np.ndarray)):
        raise RewardError(
            f"reward {spec.name!r} returned a {type(result).__name__}; a reward returns a list with one "
            "score (float or None) per rollout"
        )
    if len(result) != expected:
        raise RewardError(
            f"reward {spec.name!r} returned {len(result)} scores for {expected} rollouts; "
            "return exactly one score (float or None) per rollout, in order"
        )
    scores: list[float | None] = []
    for i, value in enumerate(result):
        if value is None:
            scores.append(None)
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            scores.append(float(value))
        else:
            raise RewardError(
                f"reward {spec.name!r} returned {value!r} ({type(value).__name__}) for sample {i}; "
                "each score must be a finite number, or None for no score"
            )
    return scores


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan
