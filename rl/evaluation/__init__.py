"""`vocalign eval`: held-out evaluation suites, bootstrap intervals, reports.

See `suites` (what is measured), `userdata` (your own data's formats), `targets` (what
can be evaluated), `run` (generation and aggregation), `stats` (intervals) and `report`
(eval.json, eval.md, plots).
"""

from .run import PreparedSuite, Report, evaluate_policy, evaluate_targets, prepare_suites, summarise
from .stats import Estimate, bootstrap_mean, paired_difference
from .suites import SUITES, SampleResult, Suite, Variation, get_suite, register_suite
from .targets import Target, resolve_targets

__all__ = [
    "SUITES", "Estimate", "PreparedSuite", "Report", "SampleResult", "Suite", "Target", "Variation",
    "bootstrap_mean", "evaluate_policy", "evaluate_targets", "get_suite", "paired_difference",
    "prepare_suites", "register_suite", "resolve_targets", "summarise",
]
