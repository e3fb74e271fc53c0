"""Throughput of every built-in reward: rollouts scored per second, in batches of 64.

    .venv/bin/python bench/bench_rewards.py [--batch 64] [--repeats 5] [--threads 1]

The rollouts are what the demo's GRPO stage scores: spoken arithmetic answers with a
think block, a text answer, and speech rendered by the embedded detokenizer in a
requested style (about 0.4-1 s of audio each), plus a reference transcript for
`asr_wer`. Each reward is called once first (that call loads its models: the ASR
recognizer, the reward model), then timed over `--repeats` calls on the same batch;
the table gives the median. `reward_model` scores through a small reward model trained
here first (a few seconds), since it needs a saved one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from vocalign.data.synthetic import number_to_words
from vocalign.data.types import STYLE_LEVELS, Message, Prompt, Response, Rollout, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer
from vocalign.rewards import RewardSpec, list_rewards, score


def make_rollouts(n: int, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    detokenizer = EspeakUnitDetokenizer()
    tokenizer = ChatTokenizer(build_tokenizer(n_audio_tokens=len(detokenizer.units)))
    rollouts = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, size=2))
        words = number_to_words(a + b)
        attr = list(STYLE_LEVELS)[int(rng.integers(3))]
        level = ("slow", "fast") if attr == "rate" else ("low", "high") if attr == "pitch" else ("soft", "loud")
        style = {attr: level[int(rng.integers(2))]}
        units = detokenizer.encode(words, SpeechStyle(**style))
        audio = detokenizer.render(units)
        think = f"{number_to_words(a)} plus {number_to_words(b)}"
        ids = tokenizer.render_response(Response(text=str(a + b), speech=words, think=think), units)
        parsed = tokenizer.parse_response(ids)
        question = f"what is {think}"
        prompt = Prompt(
            id=f"bench-{i}", messages=[Message("human", f"answer {level}")], task="arithmetic",
            meta={"question": question, "answer": a + b, "style": style, "transcript": words},
        )
        rollouts.append(
            Rollout(
                prompt=prompt, text=parsed.text, think=parsed.think, spoken_text=parsed.spoken_text,
                audio_tokens=parsed.audio_ids, waveform=audio.waveform, sample_rate=audio.sample_rate,
                prompt_ids=[], response_ids=ids, logprobs=[0.0] * len(ids), raw_text=tokenizer.decode_raw(ids),
                think_tokens=parsed.think_tokens, finished=parsed.finished,
            )
        )
    return rollouts


def tiny_reward_model(folder: str) -> str:
    from vocalign.rewards.training.preference_data import preference_pairs
    from vocalign.rewards.training.reward_model import RewardModelConfig, train_reward_model

    config = RewardModelConfig(steps=30, train_pairs=256, eval_pairs=32)
    train_reward_model(preference_pairs(config.train_pairs, seed=0), folder, config, seed=0, progress=False)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rollouts = make_rollouts(args.batch)
    seconds = np.mean([r.speech_seconds for r in rollouts])
    print(f"{args.batch} rollouts, {seconds:.2f} s of speech each on average, torch threads {args.threads}\n")
    print("| reward | params | first call (s) | rollouts/s | mean score |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        params_of = {"reward_model": {"path": tiny_reward_model(folder)}}
        for info in list_rewards():
            spec = RewardSpec(info.name, params=params_of.get(info.name, {}))
            t = time.perf_counter()
            first = score(rollouts, [spec])
            first_s = time.perf_counter() - t
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                score(rollouts, [spec])
                times.append(time.perf_counter() - t)
            mean = first.metrics()[f"reward/{info.name}"]
            shown = ", ".join(f"{k}={v}" for k, v in spec.params.items() if k != "path") or "defaults"
            print(f"| `{info.name}` | {shown} | {first_s:.2f} | {args.batch / statistics.median(times):,.0f} | {mean:.3f} |")


if __name__ == "__main__":
    main()
