"""vocalign's RL trainer against TRL's `GRPOTrainer`: samples per second, side by side.

    .venv/bin/python bench/bench_trl.py [--steps 5] [--warmup 1] [--threads 2] [--variants lora,full]
        [--trainers ours,trl,trl+alloc[,ours-engine,ours-forward,ours-shared,ours-fused,ours-alloc]]

Each trainer runs in a fresh Python process (spawned; `--same-process` to run them all in
this one), on the same job:
- the same Qwen2 built from a config (hidden 256, 4 layers, 4 heads (2 KV heads),
  intermediate 768, vocabulary = the embedded tokenizer's 1,024 tokens: 3.4M
  parameters), saved once and loaded by both, so both start from the same weights;
- the same prompts ("what is three plus four", ...), rendered with vocalign's chat
  template; TRL gets the rendered text, which its tokenizer turns into the same ids
  (checked);
- the same reward: the fraction of the completion's characters that are digits, on the
  completion decoded without special tokens;
- GRPO with groups of 8 (TRL `num_generations=8`), up to 64 new tokens at temperature
  1, one optimiser step per generation batch (TRL `num_iterations=1`,
  `gradient_accumulation_steps=1`, `per_device_train_batch_size = prompts x 8`; ours
  one minibatch, one epoch), the same clip range (0.2), token-mean loss, AdamW at the
  same learning rate (constant), gradient clipping at 1.0 and no KL (`beta=0`) unless
  a `-kl` variant asks for one (k3 in the loss, `--kl` weight);
- under LoRA (peft; r=16, alpha=32, all seven projections, on both) and under full
  weights.

vocalign runs with its defaults: the fast decoder for sampling, the fast training forward
(fused kernels), the shared-prompt training forward, fused LoRA, and glibc keeping freed
memory (`vocalign.rl.allocator`). That last one
is a process-wide setting TRL could have too, so `trl+alloc` runs TRL with it, and the
`ours-*` names run vocalign without one of its five (see ABLATIONS) to show what each is
worth.

TRL runs on CPU in fp32 with `gradient_checkpointing=False` (TRL turns it on by
default; ours does not checkpoint, so leaving it on would only measure recomputation)
and plain `torch.optim.AdamW` (`optim="adamw_torch"`, what ours uses), saving and
reporting nothing. The models are random: responses end at <|EOT|> when the sampler
happens to draw it, so lengths differ a little between trainers; the table gives the
mean completion length and tokens/s next to samples/s.

Timing: `--warmup` steps first (not timed), then `--steps` timed steps, in each of
`--repeats` runs per trainer (the trainers take turns, and their steps are pooled); a step's time is
wall time from the end of the previous step to the end of this one, everything
included (TRL's bookkeeping and logging too); "CPU s" is the process's CPU time over
the same span (all threads), which a busy machine disturbs less than wall time. Where the time goes is measured the same
way for both, by timing the calls that do the work: generation (our `Policy.generate`,
TRL's `_generate_single_turn`), the reward function, the log-prob forward passes (with
gradient: the update; without: the KL reference), `Tensor.backward`, gradient clipping
and the optimiser step; "other" is the rest of the step (tokenising, decoding, padding,
advantages, metrics, TRL's Trainer loop). Our trainer's own `time/*_s` split
(rollout / reward / update) is reported too. `--cprofile K` runs one more step of each
trainer under cProfile and prints its K costliest functions (that step is not timed).

Prints a Markdown table and writes bench/results/trl.json (`--out`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import contextlib
import io
import json
import multiprocessing
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every model is built from a config

import torch

from vocalign.data.synthetic import number_to_words
from vocalign.data.types import Message, Prompt, Rollout
from vocalign.model.hf_text import CausalTextLM, text_policy
from vocalign.model.lora import LORA_TARGETS
from vocalign.model.policy import Policy
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer

REWARD_NAME = "bench_digit_fraction"
VARIANTS = ("lora", "full", "lora-kl", "full-kl")


# -- the shared job -----------------------------------------------------------------------
def make_prompts(n: int) -> list[Prompt]:
    """`n` short text-only arithmetic questions (no audio), the same for both trainers."""
    prompts = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        op = "plus" if i % 2 == 0 else "minus"
        if op == "minus" and b > a:
            a, b = b, a
        question = f"what is {number_to_words(a)} {op} {number_to_words(b)}"
        prompts.append(Prompt(id=f"bench-{i}", messages=[Message("human", question)], task="arithmetic",
                              meta={"answer": a + b if op == "plus" else a - b}))
    return prompts


def model_config(tokenizer: ChatTokenizer, args: argparse.Namespace):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.special["<|BOT|>"],
    )


def digit_fraction(text: str) -> float:
    """The reward: the fraction of the text's characters that are digits (0 for an empty text)."""
    return sum(c.isdigit() for c in text) / len(text) if text else 0.0


class Clock:
    """Seconds spent in named buckets; a bucket entered again while open counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def time(self, bucket: str) -> Iterator[None]:
        if self._open[bucket]:
            yield
            return
        self._open[bucket] += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[bucket] += time.perf_counter() - start
            self._open[bucket] -= 1

    def timed(self, fn: Callable, bucket: str | Callable[[], str]) -> Callable:
        """`fn`, timed into `bucket` (or into the bucket `bucket()` names at call time)."""

        def wrapper(*a, **k):
            with self.time(bucket() if callable(bucket) else bucket):
                return fn(*a, **k)

        return wrapper

    def reset(self) -> None:
        self.seconds.clear()


CLOCK = Clock()
_DECODE: Callable[[list[int]], str] | None = None  # the tokenizer's decode, set in main()


def ours_reward(rollouts: list[Rollout]) -> list[float]:
    """The reward for our trainer: on the response decoded without special tokens, as TRL decodes it."""
    with CLOCK.time("reward"):
        return [digit_fraction(_DECODE(r.response_ids)) for r in rollouts]


def trl_reward(prompts: list, completions: list[str], **kwargs) -> list[float]:
    """The same reward for TRL, which passes the decoded completions."""
    with CLOCK.time("reward"):
        return [digit_fraction(c) for c in completions]


def forward_bucket() -> str:
    return "logprob forward" if torch.is_grad_enabled() else "reference forward"


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Time `Tensor.backward`, gradient clipping and every optimiser step into CLOCK, for both trainers alike."""
    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    starts: list[float] = []

    def pre(optimizer, a, k) -> None:
        starts.append(time.perf_counter())

    def post(optimizer, a, k) -> None:
        CLOCK.seconds["optimizer step"] += time.perf_counter() - starts.pop()

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    torch.Tensor.backward = CLOCK.timed(backward, "backward")
    torch.nn.utils.clip_grad_norm_ = CLOCK.timed(clip, "grad clip")
    try:
        yield
    finally:
        torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = backward, clip
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def timed_policy_methods() -> Iterator[None]:
    """Time `Policy.generate` and its log-prob passes into CLOCK, on the class: a full-weight
    policy's KL reference is another `Policy` object over the frozen copy."""
    saved = {name: Policy.__dict__[name] for name in ("generate", "logprobs", "logprobs_and_entropy") if name in Policy.__dict__}
    for name, fn in saved.items():
        setattr(Policy, name, CLOCK.timed(fn, "generate" if name == "generate" else forward_bucket))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Policy, name, fn)


def profile_text(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- our trainer ----------------------------------------------------------------------------
def build_ours(policy: Policy, args: argparse.Namespace, kl: float) -> Callable[[list[Prompt], int], dict[str, float]]:
    """Our trainer on `policy`, as one `(prompts, step) -> metrics` call.

    All construction of our trainer is here, so a change of its API touches only this
    function: GRPO (group-normalised advantages, PPO's clipped token loss, token-mean),
    one epoch of one minibatch per batch of rollouts, the k3 KL in the loss when `kl` > 0.
    """
    from vocalign.rewards import RewardSpec
    from vocalign.rl.config import KLConfig, LossConfig, RLConfig
    from vocalign.rl.trainer import PromptCursor, RLTrainer
    from vocalign.rollouts.worker import RolloutWorker

    rl = RLConfig(
        algorithm="grpo", advantage="group", scale_rewards=True, steps=args.warmup + args.steps,
        prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, grad_clip=1.0, epochs=1, minibatches=1,
        grad_accum=1, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens,
    )
    trainer = RLTrainer(
        policy, RolloutWorker(policy, render_speech=False), [RewardSpec(REWARD_NAME)], rl,
        LossConfig(policy="ppo", aggregation="token-mean", clip_low=0.2, clip_high=0.2),
        KLConfig(coef=kl, estimator="k3", mode="loss"), seed=args.seed,
    )
    # the cursor hands the trainer this step's prompts (all of them: prompts_per_step = len(prompts))
    return lambda prompts, step: trainer.step(PromptCursor(prompts, args.seed), step)[0]


ABLATIONS = {  # ours without one of its fast paths: what each is worth
    "ours-engine": "sampling through transformers (rollouts.engine: hf) instead of the fast decoder",
    "ours-forward": "the training forward through transformers (rl.forward_engine: hf) instead of the fast one",
    "ours-shared": "each sample's prompt run again in the training forward (rl.shared_prompt_forward: false)",
    "ours-fused": "peft's own LoRA forward instead of the fused one",
    "ours-alloc": "glibc's default allocator behaviour (VOCALIGN_KEEP_FREED_MEMORY=0)",
}


def run_ours(variant: str, folder: Path, tokenizer: ChatTokenizer, prompts: list[Prompt], args, without: str = "") -> dict[str, Any]:
    CLOCK.reset()
    torch.manual_seed(args.seed)
    policy = text_policy(CausalTextLM.from_pretrained(folder), tokenizer)
    if variant.startswith("lora"):
        policy.enable_lora(r=args.lora_r, alpha=args.lora_alpha, dropout=0.0, target_modules=list(LORA_TARGETS))
        if without == "ours-fused":
            from vocalign.model.lora import unfuse_lora

            unfuse_lora(policy.model)
    policy.freeze_encoder()
    policy.decode_engine = "hf" if without == "ours-engine" else "auto"
    policy.shared_prompt_forward = without != "ours-shared"
    policy.forward_engine = "hf" if without == "ours-forward" else "auto"
    step_fn = build_ours(policy, args, args.kl if variant.endswith("-kl") else 0.0)
    step_s, cpu_s, metrics = [], [], []
    profile = ""
    with instrumented(), timed_policy_methods():
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                CLOCK.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            m = step_fn(prompts, step)
            step_s.append(time.perf_counter() - start)
            cpu_s.append(time.process_time() - cpu_start)
            metrics.append(m)
        breakdown = dict(CLOCK.seconds)
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            step_fn(prompts, args.warmup + args.steps)
            profiler.disable()
            profile = profile_text(profiler, args.cprofile)
    timed = metrics[args.warmup:]
    own = {k: statistics.mean(m[k] for m in timed) for k in timed[0] if k.startswith("time/")}
    return {
        "step_s": step_s[args.warmup:],
        "cpu_step_s": cpu_s[args.warmup:],
        "warmup_s": step_s[: args.warmup],
        "completion_tokens": statistics.mean(m["response/tokens"] for m in timed),
        "reward": statistics.mean(m.get("reward/mean", m.get("batch/reward_mean", float("nan"))) for m in timed),
        "breakdown_s": breakdown,
        "own_timing_s": own,
        "profile": profile,
    }


# -- TRL ------------------------------------------------------------------------------------
def run_trl(variant: str, folder: Path, tokenizer: ChatTokenizer, prompts: list[Prompt], args) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    rendered = [tokenizer.decode_raw(tokenizer.render_prompt(p.messages, [])) for p in prompts]
    ours_ids = [tokenizer.render_prompt(p.messages, []) for p in prompts]
    if tokenizer.hf(text=rendered)["input_ids"] != ours_ids:
        raise RuntimeError("TRL would tokenise the rendered prompts to other ids than ours; the comparison would be unfair")
    extra_steps = 1 if args.cprofile else 0
    total_steps = args.warmup + args.steps

    class Steps(TrainerCallback):
        """Wall clock at each step's end, TRL's logged metrics, and the cProfile of the extra step."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.logs: list[dict[str, float]] = []
            self.breakdown: dict[str, float] = {}
            self.profiler = cProfile.Profile() if args.cprofile else None

        def on_train_begin(self, *a, **k) -> None:
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **k) -> None:
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())
            if state.global_step == args.warmup:
                CLOCK.reset()
            if state.global_step == total_steps:
                self.breakdown = dict(CLOCK.seconds)
                if self.profiler:
                    self.profiler.enable()
            if state.global_step == total_steps + extra_steps and self.profiler:
                self.profiler.disable()

        def on_log(self, a, state, control, logs=None, **k) -> None:
            self.logs.append(dict(logs or {}))

    CLOCK.reset()
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    kl = args.kl if variant.endswith("-kl") else 0.0
    peft_config = None
    if variant.startswith("lora"):
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer wants a folder; nothing is written to it
        config = GRPOConfig(
            output_dir=scratch, max_steps=total_steps + extra_steps, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
            per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
            num_generations=args.group, num_iterations=1, steps_per_generation=1,
            max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
            beta=kl, epsilon=0.2, loss_type="bnpo", scale_rewards="group", mask_truncated_completions=False,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, log_completions=False,
            dataloader_num_workers=0, shuffle_dataset=False, seed=args.seed, data_seed=args.seed,
        )
        steps = Steps()
        trainer = GRPOTrainer(
            model=model, reward_funcs=trl_reward, args=config, processing_class=tokenizer.hf,
            train_dataset=Dataset.from_dict({"prompt": rendered}), peft_config=peft_config, callbacks=[steps],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer._generate_single_turn = CLOCK.timed(trainer._generate_single_turn, "generate")
        trainer._get_per_token_logps_and_entropies = CLOCK.timed(trainer._get_per_token_logps_and_entropies, forward_bucket)
        with instrumented():
            trainer.train()
    ends = [steps.begin] + steps.ends
    step_s = [b - a for a, b in zip(ends, ends[1:])][:total_steps]
    cpu_ends = [steps.cpu_begin] + steps.cpu_ends
    cpu_s = [b - a for a, b in zip(cpu_ends, cpu_ends[1:])][:total_steps]
    logs = [entry for entry in steps.logs if "completions/mean_length" in entry][args.warmup:total_steps]
    return {
        "step_s": step_s[args.warmup:],
        "cpu_step_s": cpu_s[args.warmup:],
        "warmup_s": step_s[: args.warmup],
        "completion_tokens": statistics.mean(entry["completions/mean_length"] for entry in logs),
        "reward": statistics.mean(entry["reward"] for entry in logs),
        "breakdown_s": steps.breakdown,
        "own_timing_s": {"step_time": statistics.mean(entry["step_time"] for entry in logs if "step_time" in entry)}
        if any("step_time" in entry for entry in logs) else {},
        "profile": profile_text(steps.profiler, args.cprofile) if steps.profiler else "",
    }


# -- report ---------------------------------------------------------------------------------
def pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one trainer as one: their timed steps together, time per phase summed."""
    breakdown: dict[str, float] = defaultdict(float)
    for r in results:
        for k, v in r["breakdown_s"].items():
            breakdown[k] += v
    return {
        "step_s": [s for r in results for s in r["step_s"]],
        "cpu_step_s": [s for r in results for s in r["cpu_step_s"]],
        "warmup_s": [s for r in results for s in r["warmup_s"]],
        "completion_tokens": statistics.mean(r["completion_tokens"] for r in results),
        "reward": statistics.mean(r["reward"] for r in results),
        "breakdown_s": dict(breakdown),
        "own_timing_s": results[0]["own_timing_s"],
        "profile": next((r["profile"] for r in results if r["profile"]), ""),
    }


def summarise(result: dict[str, Any], samples: int, n_steps: int) -> dict[str, Any]:
    mean_s = statistics.mean(result["step_s"])
    per_step = {k: v / n_steps for k, v in sorted(result["breakdown_s"].items())}
    per_step["other"] = mean_s - sum(per_step.values())
    return {
        **result,
        "mean_step_s": mean_s,
        "median_step_s": statistics.median(result["step_s"]),
        "mean_cpu_step_s": statistics.mean(result["cpu_step_s"]),
        "samples_per_s": samples / mean_s,
        "tokens_per_s": samples * result["completion_tokens"] / mean_s,
        "breakdown_per_step_s": per_step,
    }


BUCKETS = ["generate", "reward", "reference forward", "logprob forward", "backward", "grad clip", "optimizer step", "other"]


def table(rows: list[dict[str, Any]]) -> str:
    head = ["variant", "trainer", "step s", "CPU s", "samples/s", "tokens/s", "resp. tokens", *BUCKETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        b = r["breakdown_per_step_s"]
        cells = [r["variant"], r["trainer"], f"{r['mean_step_s']:.2f}", f"{r['mean_cpu_step_s']:.2f}", f"{r['samples_per_s']:.1f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['completion_tokens']:.1f}"]
        cells += [f"{b.get(k, 0.0):.2f}" for k in BUCKETS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer and variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="runs of each trainer, alternating between trainers; steps pooled")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (TRL num_generations)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per response")
    p.add_argument("--variants", default="lora,full", help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--kl", type=float, default=0.04, help="KL weight of the -kl variants (TRL beta)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainers", default="ours,trl,trl+alloc",
                   help="which to run, in order: ours, trl, trl+alloc (TRL with vocalign's allocator setting), and "
                        "ours without one fast path: " + ", ".join(f"{k} ({v})" for k, v in ABLATIONS.items()))
    p.add_argument("--same-process", action="store_true",
                   help="run every trainer in this process instead of a fresh one each (settings carry over)")
    p.add_argument("--cprofile", type=int, default=0, help="profile one extra step of each trainer; print its K costliest functions")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl.json"))
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: {unknown} not known; use some of {', '.join(VARIANTS)}")
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    known = {"ours", "trl", "trl+alloc", *ABLATIONS}
    if not set(args.trainers) <= known or not args.trainers:
        p.error(f"--trainers={','.join(args.trainers)}: use some of {', '.join(sorted(known))}")
    if args.same_process and "ours-alloc" in args.trainers:
        p.error("--trainers ours-alloc needs a fresh process (the allocator setting cannot be undone); drop --same-process")
    for name in ("steps", "warmup", "threads", "prompts", "new_tokens", "repeats"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is too small")
    if args.group < 2:
        p.error(f"--group={args.group}: GRPO needs at least 2 responses per prompt")
    return args


def setup(args: argparse.Namespace) -> ChatTokenizer:
    """What every run needs, in whichever process it runs: threads, quiet logging, the tokenizer, the reward."""
    global _DECODE
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from vocalign.rewards import get_reward, reward

    tokenizer = ChatTokenizer(build_tokenizer(0))
    _DECODE = lambda ids: tokenizer.hf.decode(ids, skip_special_tokens=True)  # noqa: E731
    try:
        get_reward(REWARD_NAME)
    except ValueError:  # not registered yet (main() may run twice in one process)
        reward(REWARD_NAME)(ours_reward)
    return tokenizer


def run_trainer(name: str, variant: str, folder: str, args: argparse.Namespace) -> dict[str, Any]:
    """One trainer on one variant. `trl+alloc` is TRL with vocalign's allocator setting
    (`keep_freed_memory`, which vocalign's trainers apply): it shows how much of the
    difference that setting alone makes."""
    if name == "ours-alloc":
        os.environ["VOCALIGN_KEEP_FREED_MEMORY"] = "0"  # before the trainer applies it
    tokenizer = setup(args)
    prompts = make_prompts(args.prompts)
    if name in ABLATIONS:
        return run_ours(variant, Path(folder), tokenizer, prompts, args, without=name)
    if name == "trl+alloc":
        from vocalign.rl.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise RuntimeError("trl+alloc: keep_freed_memory() did not apply here (not glibc, or VOCALIGN_KEEP_FREED_MEMORY=0)")
        return run_trl(variant, Path(folder), tokenizer, prompts, args)
    return {"ours": run_ours, "trl": run_trl}[name](variant, Path(folder), tokenizer, prompts, args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import trl
    import transformers

    tokenizer = setup(args)
    prompts = make_prompts(args.prompts)
    samples = args.prompts * args.group
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(args.seed)
        from transformers import Qwen2ForCausalLM

        initial = Qwen2ForCausalLM(model_config(tokenizer, args))
        n_params = sum(p.numel() for p in initial.parameters())
        initial.save_pretrained(folder)  # both trainers load these weights
        for variant in args.variants:
            runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
            loads: dict[str, list[float]] = defaultdict(list)
            for repeat in range(args.repeats):  # trainers alternate, so a slow spell of the machine hits each alike
                for name in args.trainers:
                    loads[name].append(os.getloadavg()[0])
                    if args.same_process:
                        result = run_trainer(name, variant, folder, args)
                    else:  # a fresh interpreter per run: no allocator state, imports or settings carried over
                        spawn = multiprocessing.get_context("spawn")
                        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                            result = pool.submit(run_trainer, name, variant, folder, args).result()
                    runs[name].append(result)
                    print(f"{variant:8s} {name:11s} run {repeat + 1}/{args.repeats}: {statistics.mean(result['step_s']):.2f} s/step, "
                          f"{result['completion_tokens']:.1f} tokens/response", flush=True)
                    if result["profile"]:
                        print(result["profile"])
            for name in args.trainers:
                row = {"variant": variant, "trainer": name, **summarise(pooled(runs[name]), samples, args.steps * args.repeats),
                       "run_mean_step_s": [statistics.mean(r["step_s"]) for r in runs[name]],
                       "load_average_1min": loads[name], "torch_threads": args.threads}
                rows.append(row)
    ratios = {}
    for variant in args.variants:
        by = {r["trainer"]: r for r in rows if r["variant"] == variant}
        if {"ours", "trl"} <= set(by):
            ratios[variant] = {
                "samples_per_s": by["ours"]["samples_per_s"] / by["trl"]["samples_per_s"],
                "tokens_per_s": by["ours"]["tokens_per_s"] / by["trl"]["tokens_per_s"],
                "cpu_time_trl_over_ours": by["trl"]["mean_cpu_step_s"] / by["ours"]["mean_cpu_step_s"],
            }
            # each repeat's ours against the TRL run beside it: the spread of the ratio
            ratios[variant]["per_repeat"] = [t / o for o, t in zip(by["ours"]["run_mean_step_s"], by["trl"]["run_mean_step_s"])]
            if "trl+alloc" in by:
                ratios[variant]["samples_per_s_vs_trl_alloc"] = by["ours"]["samples_per_s"] / by["trl+alloc"]["samples_per_s"]
    prompt_tokens = [len(tokenizer.render_prompt(p.messages, [])) for p in prompts]
    report = {
        "command": "bench/bench_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "model": {"parameters": n_params, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": max(1, args.heads // 2), "intermediate": args.intermediate, "vocab": len(tokenizer)},
        "prompt_tokens": {"mean": statistics.mean(prompt_tokens), "min": min(prompt_tokens), "max": max(prompt_tokens)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M")},
        "results": rows,
        "ratio_ours_over_trl": ratios,
    }
    print()
    print(f"{samples} responses per step ({args.prompts} prompts x {args.group}), up to {args.new_tokens} new tokens, "
          f"{n_params / 1e6:.2f}M parameters, prompts of {report['prompt_tokens']['mean']:.1f} tokens, "
          f"{args.steps} timed steps after {args.warmup} warm-up, torch on {args.threads} threads; "
          "seconds per step by where they went:")
    print(table(rows))
    for variant, r in ratios.items():
        also = (f"; ours / (TRL with vocalign's allocator setting) = {r['samples_per_s_vs_trl_alloc']:.2f}x samples/s"
                if "samples_per_s_vs_trl_alloc" in r else "")
        spread = ", ".join(f"{x:.2f}" for x in r["per_repeat"])
        print(f"{variant}: ours / TRL = {r['samples_per_s']:.2f}x samples/s (each repeat: {spread}), "
              f"{r['tokens_per_s']:.2f}x tokens/s; TRL's CPU time per step / ours = {r['cpu_time_trl_over_ours']:.2f}{also}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
