"""The fast sampling decoder and the fast training forward (`vocalign.model.engine`) and
the shared-prompt training forward (`Policy.response_logits`), each against the plain
`transformers` path on the three model kinds vocalign runs: the embedded Step-Audio-2-style model (audio prompts),
Qwen2-Audio and a text-only Qwen2, all tiny and built from configs."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from vocalign.data.espeak import synthesize
from vocalign.data.types import Audio, Message, Prompt
from vocalign.model import chat
from vocalign.model.engine import FastDecoder, FastForward
from vocalign.model.hf_audio import Qwen2AudioLM
from vocalign.model.hf_text import CausalTextLM, text_policy
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer

from test_qwen2_audio import tiny_qwen2_audio

SR = 16000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def text_lm(tokenizer: ChatTokenizer, hidden_act: str = "silu") -> Policy:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, hidden_act=hidden_act,
    )
    return text_policy(CausalTextLM(Qwen2ForCausalLM(config).eval()), tokenizer)


def make_policy(kind: str) -> Policy:
    if kind == "embedded":
        return embedded_policy(seed=0)
    if kind == "qwen2-audio":
        tokenizer = build_tokenizer(16)
        torch.manual_seed(0)
        return Policy(Qwen2AudioLM(tiny_qwen2_audio(len(tokenizer), tokenizer.convert_tokens_to_ids(chat.AUDIO_PATCH))),
                      ChatTokenizer(tokenizer))
    return text_lm(ChatTokenizer(build_tokenizer(0)))


def make_prompts(kind: str) -> list[Prompt]:
    """Prompts of different lengths (a left-padded batch), with speech unless the model is text-only."""
    voice = kind != "text"
    clip = lambda text: Audio(synthesize(text, sample_rate=SR), SR) if voice else None  # noqa: E731
    return [
        Prompt("a", [Message("human", "what is five plus three" if not voice else "", clip("what is five plus three"))]),
        Prompt("b", [Message("system", "be brief"), Message("human", "say it slowly", clip("hello"))]),
        Prompt("c", [Message("human", "what is two plus two")]),
    ]


def randomise_lora(policy: Policy, seed: int = 1) -> None:
    """Give the adapters non-zero B matrices, so merging them changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def policy_under_test(kind: str, lora: bool) -> Policy:
    """`kind`'s policy, under LoRA with non-zero adapters when `lora`."""
    policy = make_policy(kind)
    if lora:
        policy.enable_lora(r=4, alpha=8)
        randomise_lora(policy)
    return policy


def generate(policy: Policy, engine: str, prompts: list[Prompt], seed: int = 7, **sampling):
    policy.decode_engine = engine
    return policy.generate(policy.encode_prompts(prompts), n=3, sampling=Sampling(**{"max_new_tokens": 16, **sampling}), seed=seed)


def assert_same_generations(fast, hf) -> None:
    assert [g.response_ids for g in fast] == [g.response_ids for g in hf]
    assert [g.finished for g in fast] == [g.finished for g in hf]
    for a, b in zip(fast, hf):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------- the fast decoder
@pytest.mark.parametrize("kind", ["embedded", "qwen2-audio", "text"])
@pytest.mark.parametrize("lora", [False, True])
def test_fast_decoder_samples_what_transformers_samples(kind, lora):
    policy = policy_under_test(kind, lora)
    assert FastDecoder.unsupported(policy.model) is None
    prompts = make_prompts(kind)
    fast, hf = generate(policy, "fast", prompts, temperature=1.3), generate(policy, "hf", prompts, temperature=1.3)
    assert_same_generations(fast, hf)
    assert len({tuple(g.response_ids) for g in fast}) > 3  # sampled, not one repeated sequence
    # the sampler's log-probs are the trainer's
    batch = policy.encode_prompts(prompts)
    seq = policy.sequences([batch.ids[g.prompt_index] for g in fast], [g.response_ids for g in fast],
                           [batch.encoded[g.prompt_index] for g in fast])
    with torch.no_grad():
        scored = policy.logprobs(seq, temperature=1.3)
    for k, g in enumerate(fast):
        torch.testing.assert_close(scored[k, : len(g.logprobs)], torch.tensor(g.logprobs), atol=1e-5, rtol=0)


def test_fast_decoder_follows_the_weights_and_disabled_adapters():
    """Built when generation starts: an update is seen at the next call; under disable_adapter
    (the KL reference) it samples the base model, as transformers does."""
    policy = make_policy("text")
    policy.enable_lora(r=4, alpha=8)
    prompts = make_prompts("text")
    before = generate(policy, "fast", prompts)
    randomise_lora(policy, seed=3)
    after_fast, after_hf = generate(policy, "fast", prompts), generate(policy, "hf", prompts)
    assert_same_generations(after_fast, after_hf)
    assert [g.response_ids for g in after_fast] != [g.response_ids for g in before]
    with policy.model.lm.disable_adapter():
        base_fast, base_hf = generate(policy, "fast", prompts), generate(policy, "hf", prompts)
    assert_same_generations(base_fast, base_hf)
    assert_same_generations(base_fast, before)  # B was zero before: the base model


def stop_id_runs(policy: Policy, prompts: list[Prompt], engines: tuple[str, str]) -> tuple[int, dict]:
    """A token the first engine samples mid-response, and each engine's generations with it
    as a stop id (it cuts responses there)."""
    counts: dict[int, int] = {}
    for g in generate(policy, engines[0], prompts, temperature=1.5):
        for t in g.response_ids[1:-1]:
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)
    batch = policy.encode_prompts(prompts)
    runs = {}
    for engine in engines:
        policy.decode_engine = engine
        runs[engine] = policy.generate(batch, n=3, sampling=Sampling(max_new_tokens=16, temperature=1.5), seed=7, stop_ids=[stop])
    assert any(g.response_ids[-1] == stop and len(g.response_ids) < 16 for g in runs[engines[0]])
    return stop, runs


def test_stop_ids_and_top_p_behave_the_same():
    policy = make_policy("embedded")
    prompts = make_prompts("embedded")
    for sampling in ({"top_p": 0.8}, {"temperature": 1e-4}):
        assert_same_generations(generate(policy, "fast", prompts, **sampling), generate(policy, "hf", prompts, **sampling))
    _, runs = stop_id_runs(policy, prompts, ("hf", "fast"))
    assert_same_generations(runs["fast"], runs["hf"])


def test_an_unsupported_model_falls_back_or_is_refused_with_the_reason():
    policy = text_lm(ChatTokenizer(build_tokenizer(0)), hidden_act="gelu")
    reason = FastDecoder.unsupported(policy.model)
    assert reason is not None and "gelu" in reason
    prompts = make_prompts("text")
    assert_same_generations(generate(policy, "auto", prompts), generate(policy, "hf", prompts))  # auto: transformers
    with pytest.raises(ValueError, match="rollouts.engine is 'fast'.*gelu.*rollouts.engine: auto"):
        generate(policy, "fast", prompts)
    with pytest.raises(ValueError, match="no `lm` attribute"):
        FastDecoder(torch.nn.Linear(2, 2))


def test_the_kv_cache_refuses_to_overflow():
    policy = make_policy("text")
    engine = FastDecoder(policy.model)
    batch = policy.encode_prompts(make_prompts("text")[:1])
    ids = torch.tensor(batch.ids)
    embeds = policy.model.input_embeddings(ids, None)
    positions = torch.arange(ids.shape[1])[None]
    with pytest.raises(RuntimeError, match="before prefill"):
        FastDecoder(policy.model).step(embeds[:, -1:], positions[:, -1:])
    with pytest.raises(ValueError, match="smaller than the prompt length"):
        engine.prefill(embeds, torch.ones_like(ids), positions, capacity=ids.shape[1] - 1)
    engine.prefill(embeds, torch.ones_like(ids), positions, capacity=ids.shape[1] + 1)
    engine.step(embeds[:, -1:], positions[:, -1:] + 1)
    with pytest.raises(RuntimeError, match="full; prefill with a larger capacity"):
        engine.step(embeds[:, -1:], positions[:, -1:] + 2)


# ------------------------------------------- shared-prompt forward and the fast training forward
def shuffled_rows(policy: Policy, kind: str):
    """A training batch of 3 samples each of `kind`'s prompts, rows shuffled (groups need not
    be contiguous: a minibatch is any subset)."""
    prompts = make_prompts(kind)
    batch = policy.encode_prompts(prompts)
    gens = generate(policy, "auto", prompts, temperature=1.3)
    rows = list(range(len(gens)))
    random.Random(0).shuffle(rows)
    seq = policy.sequences([batch.ids[gens[r].prompt_index] for r in rows], [gens[r].response_ids for r in rows],
                           [batch.encoded[gens[r].prompt_index] for r in rows])
    assert seq.prompt_of_row is not None and len(set(seq.prompt_of_row)) == len(prompts)
    return seq


FORWARDS = [("hf", False), ("hf", True), ("fast", False), ("fast", True)]  # (rl.forward_engine, shared prompts)


@pytest.mark.parametrize("kind", ["embedded", "qwen2-audio", "text"])
@pytest.mark.parametrize("lora", [False, True])
def test_every_training_forward_gives_the_plain_forwards_logprobs_and_gradients(kind, lora):
    """transformers or FastForward, each prompt once or once per row: the same log-probs,
    entropies and gradients as transformers running every row whole."""
    policy = policy_under_test(kind, lora)
    policy.freeze_encoder()
    seq = shuffled_rows(policy, kind)
    results = {}
    for engine, shared in FORWARDS:
        policy.forward_engine, policy.shared_prompt_forward = engine, shared
        policy.model.zero_grad()
        logp, entropy = policy.logprobs_and_entropy(seq)
        ((logp * torch.linspace(-1, 1, logp.shape[1])).sum() / seq.response_mask.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
        results[engine, shared] = (logp.detach(), entropy, grads)
    plain = results["hf", False]
    assert plain[2] and any(g.abs().sum() > 0 for g in plain[2].values())
    for key in FORWARDS[1:]:
        torch.testing.assert_close(results[key][0], plain[0], atol=1e-5, rtol=0, msg=str(key))
        torch.testing.assert_close(results[key][1], plain[1], atol=1e-5, rtol=0, msg=str(key))
        assert results[key][2].keys() == plain[2].keys()
        for name, grad in plain[2].items():
            torch.testing.assert_close(results[key][2][name], grad, atol=1e-5, rtol=1e-4, msg=f"{key} {name}")


def test_the_critic_reads_the_same_hidden_states_through_the_fast_forward():
    from vocalign.rl.critic import ValueModel

    policy = make_policy("embedded")
    seq = shuffled_rows(policy, "embedded")
    critic = ValueModel(policy)
    with torch.no_grad():
        critic.head.weight.normal_()
    view = critic._view
    values = {}
    for engine, shared in FORWARDS:
        view.forward_engine, view.shared_prompt_forward = engine, shared
        critic.zero_grad()
        v = critic(seq)
        v.sum().backward()
        values[engine, shared] = (v.detach(), {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None})
    plain = values["hf", False]
    assert plain[0].abs().sum() > 0 and len(plain[1]) > 2
    for key in FORWARDS[1:]:
        torch.testing.assert_close(values[key][0], plain[0], atol=1e-5, rtol=1e-5, msg=str(key))
        for name, grad in plain[1].items():  # float rounding, relative to the gradient's scale
            scale = float(grad.abs().max())
            torch.testing.assert_close(values[key][1][name], grad, atol=1e-5 * scale, rtol=1e-4, msg=f"{key} {name}")


def test_the_fast_forward_falls_back_or_refuses_with_the_reason():
    policy = make_policy("text")
    seq = shuffled_rows(policy, "text")
    assert policy.forward_for_training() is not None  # auto, on a model it runs
    policy.model.lm.activation_checkpointing_enable()
    policy.model.train()
    assert "gradient checkpointing" in FastForward.unsupported(policy.model)
    assert policy.forward_for_training() is None  # auto: transformers
    policy.forward_engine = "fast"
    with pytest.raises(ValueError, match="rl.forward_engine is 'fast'.*gradient checkpointing.*rl.forward_engine: auto"):
        policy.logprobs(seq)
    policy.forward_engine = "hf"
    assert policy.forward_for_training() is None
    gelu = text_lm(ChatTokenizer(build_tokenizer(0)), hidden_act="gelu")
    assert "gelu" in FastForward.unsupported(gelu.model) and gelu.forward_for_training() is None


def test_rows_with_their_own_prompts_take_the_plain_forward():
    policy = make_policy("text")
    batch = policy.encode_prompts(make_prompts("text"))
    seq = policy.sequences(batch.ids, [[5, 6], [7], [8, 9, 10]], batch.encoded)
    assert seq.prompt_of_row is None
    # the same ids with different audio clips are different prompts
    a, b = torch.zeros(3, 4), torch.zeros(3, 4)
    seq = policy.sequences([batch.ids[0], batch.ids[0]], [[5], [6]], [[a], [b]])
    assert seq.prompt_of_row is None
    seq = policy.sequences([batch.ids[0], batch.ids[0]], [[5], [6]], [[a], [a]])
    assert seq.prompt_of_row == [0, 0] and seq.prompt_rows == [0]


def test_the_recipe_chooses_the_engine_and_the_forward():
    from vocalign.rl.config import Recipe
    from vocalign.rl.recipe import load_recipe
    from vocalign.rl.runner import configure_policy

    policy = make_policy("text")
    assert (policy.decode_engine, policy.shared_prompt_forward, policy.forward_engine) == ("auto", True, "auto")  # the defaults
    recipe = load_recipe("demo", ["rollouts.engine=hf", "rl.shared_prompt_forward=false", "rl.forward_engine=hf"], Recipe)
    assert configure_policy(policy, recipe) is policy
    assert (policy.decode_engine, policy.shared_prompt_forward, policy.forward_engine) == ("hf", False, "hf")
    assert policy.decoder_for_sampling() is None and policy.forward_for_training() is None


def test_the_recipe_places_the_policy_on_its_device():
    from vocalign.rl.config import Recipe
    from vocalign.rl.recipe import load_recipe
    from vocalign.rl.runner import configure_policy, resolve_device

    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="model.device 'gpu0' is not a torch device.*auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.device is 'cuda' but torch sees no CUDA device"):
            resolve_device("cuda")
    policy = make_policy("text")
    configure_policy(policy, load_recipe("demo", ["model.device=cpu"], Recipe))
    assert policy.device == torch.device("cpu")


@pytest.mark.parametrize("case", ["some projections adapted", "adapter dropout, evaluating"])
def test_the_fast_forward_under_partial_lora_and_lora_dropout(case):
    """Adapters on only some of q/k/v and gate/up (the others join as zero-width blocks),
    and adapters with dropout outside training (joined; dropout is off): the transformers
    forward's values and gradients. In training, dropout makes the adapted layers run as
    their peft modules, and the forward is random."""
    from vocalign.model.engine import _plain_lora

    policy = make_policy("text")
    if case == "some projections adapted":
        policy.enable_lora(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        policy.model.train()
    else:
        policy.enable_lora(r=4, alpha=8, dropout=0.3)
        policy.model.eval()
    randomise_lora(policy)
    seq = shuffled_rows(policy, "text")
    results = {}
    for engine in ("hf", "fast"):
        policy.forward_engine = engine
        policy.model.zero_grad()
        logp = policy.logprobs(seq)
        (logp.sum() / seq.response_mask.sum()).backward()
        results[engine] = (logp.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results["fast"][0], results["hf"][0], atol=1e-5, rtol=0)
    for name, grad in results["hf"][1].items():
        torch.testing.assert_close(results["fast"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(g.abs().sum() > 0 for n, g in results["hf"][1].items() if "lora_B" in n)
    if case == "adapter dropout, evaluating":
        q_proj = policy.model.lm.get_base_model().model.layers[0].self_attn.q_proj
        assert _plain_lora(q_proj) is not None
        policy.model.train()
        assert _plain_lora(q_proj) is None  # dropout on: the peft module itself
        with torch.no_grad():
            draws = [policy.logprobs(seq) for _ in range(2)]
        assert not torch.equal(draws[0], draws[1])
