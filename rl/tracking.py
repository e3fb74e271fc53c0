"""Run tracking: the run folder's records, mirrored to Weights & Biases.

A `RunTracker` owns what a run leaves behind in its folder:

    config.yaml        the resolved recipe, secrets redacted
    metrics.jsonl      one JSON object per `log` call: {"step": ..., <metric>: ...}
    summary.json       the final numbers (`summary`)
    samples.jsonl      sampled responses with their transcripts and rewards (`log_audio_table`)
    reward_curve.png   reward against step, one panel per stage (written on close)
    wandb/             the W&B run files, when W&B is on

The local files are always written, so a run can be read without W&B. W&B goes offline
by itself when no API key is configured, and its own files stay inside the run folder.
`wandb` is imported only when it is used: the import takes about half a second.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from vocalign.rl.recipe import REDACTED, is_secret_key, redact_secrets, to_yaml

if TYPE_CHECKING:
    from vocalign.data.types import Prompt, Rollout

logger = logging.getLogger(__name__)

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = ("auto", "online", "offline", "disabled")

# A key saved by `wandb login` is filed under the API host: wandb 0.31's default
# (api.forge.coreweave.com) or the one older versions used.
_DEFAULT_WANDB_HOSTS = ("api.forge.coreweave.com", "api.wandb.ai")


class LoggingOptions(Protocol):
    """The logging settings a tracker needs (the recipe's `logging` section)."""

    wandb: bool
    project: str
    entity: str | None
    run_name: str | None
    mode: str  # "auto" | "online" | "offline" | "disabled"


class TrackingError(ValueError):
    """The logging settings cannot be used as given."""


# --- choosing the W&B mode -----------------------------------------------------------


def wandb_credentials_available() -> bool:
    """Whether W&B could authenticate without asking anyone.

    Looks where wandb looks (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, the .netrc entry
    for the W&B host) without importing wandb and without touching the network.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL")
    hosts = (urlsplit(base_url).netloc,) if base_url else _DEFAULT_WANDB_HOSTS
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entries = netrc.netrc(str(netrc_path))
    except (OSError, netrc.NetrcParseError):
        return False
    return any(entries.authenticators(host) for host in hosts)


def resolve_wandb_mode(options: LoggingOptions) -> WandbMode:
    """The W&B mode a run will use: "auto" means online when a key is configured."""
    if options.mode not in WANDB_MODES:
        raise TrackingError(
            f"logging.mode is '{options.mode}'; use one of {', '.join(WANDB_MODES)}"
        )
    if not options.wandb or options.mode == "disabled":
        return "disabled"
    if options.mode == "offline":
        return "offline"
    has_key = wandb_credentials_available()
    if options.mode == "online":
        if not has_key:
            raise TrackingError(
                "logging.mode is 'online' but no W&B API key is configured; set "
                "WANDB_API_KEY or run `wandb login`, or use logging.mode=offline and "
                "upload later with `wandb sync`"
            )
        return "online"
    # "auto": an explicit WANDB_MODE asking for less network is respected.
    wanted = os.environ.get("WANDB_MODE", "").lower()
    if wanted in ("offline", "dryrun"):
        return "offline"
    if wanted == "disabled":
        return "disabled"
    return "online" if has_key else "offline"


# --- the tracker -----------------------------------------------------------------------


class RunTracker:
    """Writes a run's metrics and summary to its folder and mirrors them to W&B.

    Use as a context manager; `close` finishes the W&B run and draws the reward curve.
    Pass the W&B id of an earlier run as `resume_id` to continue it; metrics.jsonl is
    appended to, so a resumed run keeps one file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        recipe: Mapping[str, Any],
        options: LoggingOptions,
        *,
        resume_id: str | None = None,
        reward_keys: Sequence[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.config_path = self.run_dir / "config.yaml"
        self.reward_curve_path = self.run_dir / "reward_curve.png"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.wandb_mode: WandbMode = resolve_wandb_mode(options)
        self.wandb_run_id: str | None = None
        self.wandb_dir: Path | None = None  # this run's folder inside run_dir/wandb
        # None: the total and every reward component found in the metrics (`reward/<name>`)
        self.reward_keys = None if reward_keys is None else tuple(reward_keys)
        self._recipe = redact_secrets(dict(recipe))
        self._options = options
        self._resume_id = resume_id
        self._metrics_file: IO[str] | None = None
        self._wandb_run: Any = None
        self._summary: dict[str, Any] = {}

    def __enter__(self) -> RunTracker:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=exc_type is not None)

    def open(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_yaml(self._recipe), encoding="utf-8")
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        if self.wandb_mode != "disabled":
            try:
                self._start_wandb()
            except BaseException:
                self._metrics_file.close()
                self._metrics_file = None
                raise

    def _start_wandb(self) -> None:
        import wandb

        # wandb 0.31 reports its own telemetry to its server unless the process-wide
        # settings say offline, even for a run started offline: make them agree.
        wandb.setup(wandb.Settings(mode=self.wandb_mode))
        settings = wandb.Settings() if "WANDB_SILENT" in os.environ else wandb.Settings(silent=True)
        with _secrets_hidden_from_argv():
            run = wandb.init(
                project=self._options.project,
                entity=self._options.entity,
                name=self._options.run_name,
                dir=str(self.run_dir),
                mode=self.wandb_mode,
                config=self._recipe,
                id=self._resume_id,
                resume="allow" if self._resume_id else None,
                settings=settings,
            )
        # Chart against the trainer's step; W&B's own counter only orders the rows, so
        # a stage that restarts its step count is still recorded, not dropped.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        self._wandb_run = run
        self.wandb_run_id = run.id
        self.wandb_dir = Path(run.dir).parent
        where = run.url if self.wandb_mode == "online" else self.wandb_dir
        logger.info("W&B run %s (%s): %s", run.id, self.wandb_mode, where)

    def wandb_status(self) -> str:
        """One line for the console: where this run's W&B record goes."""
        if self._wandb_run is None:
            return "W&B: off (logging.wandb=false); metrics.jsonl has every metric"
        if self.wandb_mode == "online":
            return f"W&B: {self._wandb_run.url}"
        return (f"W&B: offline (no API key found), saved in {self.wandb_dir}; upload it later with "
                f"`wandb sync {self.wandb_dir}`, or run `wandb login` before training")

    def log(self, metrics: Mapping[str, float | int | str], step: int) -> None:
        """Record one row of metrics at `step` (numbers or strings, such as the stage)."""
        if self._metrics_file is None:
            raise RuntimeError("RunTracker.log called before open(); use it in a `with` block")
        if "step" in metrics:
            raise ValueError(
                "metrics must not contain 'step'; pass the step as the `step` argument"
            )
        # a string under a secret-looking name (a token echoed by mistake) is hidden like in config.yaml
        values = redact_secrets({key: _plain_metric(key, value) for key, value in metrics.items()}, strings_only=True)
        row = {"step": int(step), **{key: _finite_or_none(value) for key, value in values.items()}}
        self._metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
        self._metrics_file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({**values, "step": int(step)})

    def summary(self, values: Mapping[str, Any]) -> None:
        """Add final numbers to summary.json (rewritten each call) and the W&B summary."""
        values = redact_secrets(dict(values), strings_only=True)
        self._summary.update(values)
        text = json.dumps(_finite_or_none(self._summary), indent=2, allow_nan=False)
        self.summary_path.write_text(text + "\n", encoding="utf-8")
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)

    def log_audio_table(
        self,
        step: int,
        rollouts: Sequence[Rollout],
        rewards: Mapping[str, Sequence[float | None]],
        total: Sequence[float],
        n: int = 4,
    ) -> list[dict[str, Any]]:
        """Record `n` of a step's responses: what was asked, what the policy wrote and said,
        what the embedded recognizer hears in its speech, and how each reward scored it.

        `rewards[name][i]` and `total[i]` belong to `rollouts[i]` (a step's `RewardScores`
        components and total). The rows go to samples.jsonl (always: the run folder stays
        readable without W&B) and, when W&B is on, to a `samples` table with the prompt's
        audio and the response's speech playable beside them. Returns the rows as written
        to samples.jsonl.
        """
        if self._metrics_file is None:
            raise RuntimeError("RunTracker.log_audio_table called before open(); use it in a `with` block")
        for name, scores in {**rewards, "total": total}.items():
            if len(scores) != len(rollouts):
                raise ValueError(
                    f"reward '{name}' has {len(scores)} scores for {len(rollouts)} rollouts; "
                    "pass one score per rollout, in rollout order"
                )
        if not rollouts:
            return []
        picked = pick_samples(rollouts, n)
        chosen = [rollouts[i] for i in picked]
        transcripts = transcribe_speech(chosen)
        rows: list[dict[str, Any]] = []
        for index, rollout, transcript in zip(picked, chosen, transcripts):
            rows.append({
                "step": int(step),
                "prompt": prompt_text(rollout.prompt),
                "response": rollout.text,
                "spoken_text": rollout.spoken_text,
                "transcript": transcript,
                "speech_seconds": round(rollout.speech_seconds, 3),
                **{f"reward/{name}": _score(scores[index]) for name, scores in rewards.items()},
                "total": _score(total[index]),
            })
        with self.samples_path.open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(_finite_or_none(row), allow_nan=False) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({"samples": _wandb_table(rows, chosen), "step": int(step)})
        return rows

    def close(self, *, failed: bool = False) -> None:
        if self._metrics_file is None:
            return
        self._metrics_file.close()
        self._metrics_file = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1 if failed else 0)
            self._wandb_run = None
            if self.wandb_mode == "offline":
                logger.info("W&B run saved offline; upload it with: wandb sync %s", self.wandb_dir)
        rows = read_metrics(self.metrics_path)
        keys = self.reward_keys or reward_components(rows)
        if any(_finite_number(row.get(key)) for row in rows for key in keys):
            plot_rewards(self.reward_curve_path, rows, keys=keys)


# --- the sample table -------------------------------------------------------------------


def pick_samples(rollouts: Sequence[Rollout], n: int) -> list[int]:
    """Indices of `n` rollouts, one per prompt before any prompt gets a second: a table
    of four answers to four questions shows more than four answers to one."""
    if n < 1:
        raise ValueError(f"the sample table needs n >= 1 rows, got n={n}")
    seen: dict[int, int] = {}
    rank = []
    for index, rollout in enumerate(rollouts):
        rank.append((seen.get(rollout.group, 0), index))
        seen[rollout.group] = seen.get(rollout.group, 0) + 1
    return sorted(index for _, index in sorted(rank)[:n])


def prompt_text(prompt: Prompt) -> str:
    """The conversation as readable text; spoken turns are marked with their length."""
    lines = []
    for message in prompt.messages:
        spoken = f"[audio {message.audio.seconds:.1f} s] " if message.audio is not None else ""
        lines.append(f"{message.role}: {spoken}{message.content}".rstrip())
    return "\n".join(lines)


def transcribe_speech(rollouts: Sequence[Rollout]) -> list[str]:
    """What the embedded recognizer hears in each rollout's speech ("" without speech).

    The table is for looking at; a recognizer that cannot be loaded or fails leaves the
    transcripts empty (with a warning) rather than stopping the run.
    """
    if not any(r.waveform is not None and len(r.waveform) > 0 for r in rollouts):
        return [""] * len(rollouts)
    try:
        from vocalign.rewards.asr import transcribe_rollouts

        return [text or "" for text in transcribe_rollouts(rollouts)]
    except Exception as error:  # noqa: BLE001 - see the docstring
        logger.warning("sample table: the embedded recognizer failed (%s); transcripts left empty", error)
        return [""] * len(rollouts)


def _score(value: float | None) -> float | None:
    return None if value is None else float(value)


def _wandb_table(rows: Sequence[Mapping[str, Any]], rollouts: Sequence[Rollout]) -> Any:
    """The rows as a W&B table, with the prompt's first clip and the response's speech as audio."""
    import wandb

    def audio(waveform: Any, rate: int) -> Any:
        return wandb.Audio(waveform, sample_rate=rate) if waveform is not None and len(waveform) > 0 else None

    columns: list[str] = []
    for key in rows[0]:  # the samples.jsonl columns, each clip beside its text
        columns.append(key)
        columns += {"prompt": ["prompt_audio"], "transcript": ["speech"]}.get(key, [])
    table = wandb.Table(columns=columns)
    for row, rollout in zip(rows, rollouts):
        clips = rollout.prompt.audio
        media = {
            "prompt_audio": audio(clips[0].waveform, clips[0].sample_rate) if clips else None,
            "speech": audio(rollout.waveform, rollout.sample_rate),
        }
        table.add_data(*[media[c] if c in media else row[c] for c in columns])
    return table


def reward_components(rows: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """`reward/mean` and each `reward/<name>` of the rows (not their /std, /failed, ...), in first-seen order."""
    keys = {"reward/mean": None}
    for row in rows:
        keys.update((k, None) for k in row if k.startswith("reward/") and k.count("/") == 1)
    return tuple(keys)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with the values of secret-looking options hidden.

    Covers overrides (`logging.api_key=...`), `--api-key=...` and `--api-key ...`.
    """
    redacted: list[str] = []
    hide_next = False
    for argument in argv:
        name, has_value, _ = argument.partition("=")
        option = name.lstrip("-").rsplit(".", 1)[-1].replace("-", "_")
        if hide_next:
            redacted.append(REDACTED)
        elif has_value and is_secret_key(option):
            redacted.append(f"{name}={REDACTED}")
        else:
            redacted.append(argument)
        hide_next = not has_value and argument.startswith("-") and is_secret_key(option)
    return redacted


@contextmanager
def _secrets_hidden_from_argv() -> Iterator[None]:
    # wandb records sys.argv in the run's metadata when the run starts.
    original = sys.argv
    sys.argv = redact_argv(original)
    try:
        yield
    finally:
        sys.argv = original


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, in order."""
    with Path(path).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _plain_metric(key: str, value: Any) -> float | int | str | bool:
    if isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"metric '{key}' is a {type(value).__name__}; log plain numbers or strings "
        "(call .item() on a one-element tensor or array)"
    )


def _finite_or_none(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- the reward curve ------------------------------------------------------------------


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"moving-average window must be at least 1, got {window}")
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages


def plot_rewards(
    path_png: str | Path,
    metrics_rows: Iterable[Mapping[str, Any]],
    keys: Sequence[str] = ("reward/mean",),
    by: str = "stage",
    *,
    window: int = 10,
) -> Path:
    """Draw each key against step, one panel per value of `by`, with a moving average."""
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in metrics_rows:
        for key in keys:
            if _finite_number(row.get(key)):
                series = panels.setdefault(str(row.get(by, "")), {}).setdefault(key, [])
                series.append((row["step"], float(row[key])))
    if not panels:
        raise ValueError(f"no metrics row has a number for {', '.join(keys)}; nothing to plot")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(figure)  # draw with Agg whatever pyplot backend is configured
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (group, series) in zip(axes, panels.items()):
        for key, points in series.items():
            steps = [step for step, _ in points]
            values = [value for _, value in points]
            (raw,) = axis.plot(steps, values, linewidth=1, alpha=0.3)  # per step, faint
            axis.plot(
                steps,
                moving_average(values, window),
                color=raw.get_color(),
                linewidth=2,
                label=f"{key.removeprefix('reward/')} (mean of last {window})",
            )
        axis.set_title(f"{by}: {group}" if group else "all steps")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    axes[0].set_ylabel("reward")
    figure.savefig(path_png, dpi=100)
    return Path(path_png)
