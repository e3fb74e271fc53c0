"""The static decoder (`vocalign.model.static_decoder`): on a CPU its fixed-shape decode step
runs eagerly, the same step a CUDA graph replays on a GPU. Checked against the fast decoder
(itself checked against transformers in test_engine.py) on the three model kinds vocalign
runs, tiny and built from configs: the same tokens from the same seeds, log-probabilities
within 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vocalign.model.decoding import decode
from vocalign.model.omni_policy import OmniPolicy
from vocalign.model.omni_tiny import write_tiny_omni
from vocalign.model.qwen2_5_omni import OmniSpeech
from vocalign.model.engine import FastDecoder
from vocalign.model.policy import Sampling
from vocalign.model.static_decoder import MAX_STOPS, StaticDecoder, batch_bucket, capacity_bucket

from test_engine import (assert_same_generations, generate, make_policy, make_prompts, policy_under_test, randomise_lora,
                         stop_id_runs, text_lm)
from test_omni import _prompts as omni_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.mark.parametrize("kind", ["embedded", "qwen2-audio", "text"])
@pytest.mark.parametrize("lora", [False, True])
def test_the_static_decoder_samples_what_the_fast_decoder_samples(kind, lora):
    policy = policy_under_test(kind, lora)
    prompts = make_prompts(kind)
    static, fast = generate(policy, "static", prompts, temperature=1.3), generate(policy, "fast", prompts, temperature=1.3)
    assert isinstance(policy._static, StaticDecoder)
    assert_same_generations(static, fast)
    assert len({tuple(g.response_ids) for g in static}) > 3  # sampled, not one repeated sequence
    # 3 prompts x 3 samples pad to a batch of 16, prompt + 16 new tokens to a multiple of 64;
    # on a CPU nothing is captured
    P = max(len(ids) for ids in policy.encode_prompts(prompts).ids)
    assert policy._static.graphs == [(16, capacity_bucket(P + 16), False, False, False)]


def test_top_p_greedy_and_stop_ids_behave_the_same():
    policy = make_policy("embedded")
    prompts = make_prompts("embedded")
    for sampling in ({"top_p": 0.8}, {"temperature": 1e-4}):
        assert_same_generations(generate(policy, "static", prompts, **sampling), generate(policy, "fast", prompts, **sampling))
    _, runs = stop_id_runs(policy, prompts, ("static", "fast"))
    assert_same_generations(runs["static"], runs["fast"])
    # the nucleus and the plain sampler are two buckets of the same shape
    assert sorted(key[2] for key in policy._static.graphs) == [False, True]


def test_it_follows_the_weights_without_rebuilding():
    """One decoder per policy: each generation copies the current weights (LoRA merged) into
    the buffers its graphs read, so an update is seen and the graphs are kept."""
    policy = make_policy("text")
    policy.enable_lora(r=4, alpha=8)
    prompts = make_prompts("text")
    before = generate(policy, "static", prompts)
    decoder, buffers = policy._static, policy._static._graphs
    randomise_lora(policy, seed=3)
    after = generate(policy, "static", prompts)
    assert policy._static is decoder and policy._static._graphs is buffers
    assert_same_generations(after, generate(policy, "fast", prompts))
    assert [g.response_ids for g in after] != [g.response_ids for g in before]
    with policy.model.lm.disable_adapter():  # the KL reference's view: the base model
        assert_same_generations(generate(policy, "static", prompts), before)


def test_buckets_pad_the_batch_and_the_oldest_is_dropped():
    assert [batch_bucket(n) for n in (1, 2, 3, 8, 9, 128, 129)] == [1, 2, 4, 8, 16, 128, 256]
    assert [capacity_bucket(n) for n in (1, 64, 65, 300)] == [64, 64, 128, 320]
    policy = make_policy("text")
    decoder = StaticDecoder(policy.model, max_graphs=2)
    batch = policy.encode_prompts(make_prompts("text"))
    prompts = policy.sequences(batch.ids, [[] for _ in batch.ids], batch.encoded)
    P = prompts.prompt_len
    embeds = policy.model.input_embeddings(prompts.input_ids[:, :P], None)
    mask = prompts.attention_mask[:, :P]
    stops = torch.tensor([policy.tokenizer.eot_id])
    for rows, T in (([0, 1, 2], 8), ([0, 1, 2, 0, 1], 8), ([2], 8), ([0, 1, 2], 8)):
        uniforms = torch.rand(len(rows), T, generator=torch.Generator().manual_seed(5))
        args = (embeds, mask, torch.tensor(rows), uniforms, Sampling(max_new_tokens=T), stops, policy.tokenizer.pad_id)
        got = decode(policy.model, decoder, *args)
        want = decode(policy.model, FastDecoder(policy.model), *args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # batches of 3, 5 and 1 rows: buckets 4, 8 and 1; two are kept, the least recently used dropped
    assert [key[0] for key in decoder.graphs] == [1, 4]


def test_qwen2_5_omni_thinker_and_talker_sample_what_transformers_samples(tmp_path):
    """The thinker (recording what the talker reads) and the talker (reading it, through its
    input projection, never sampling unrenderable codes) after a transformers prefill: the
    same text and codes as transformers' loop, log-probs within 1e-5, with and without LoRA."""
    omni = OmniSpeech.load(write_tiny_omni(tmp_path, seed=0))
    policy = OmniPolicy(omni)
    stopped = 0
    for lora in (False, True):
        if lora:
            policy.enable_lora(r=4, alpha=8)
            randomise_lora(policy)
        for prompt in omni_prompts():
            runs = {}
            for engine in ("hf", "static"):
                policy.decode_engine = engine
                runs[engine] = omni.sample_group(prompt, Sampling(temperature=1.5, max_new_tokens=8), seed=3, indices=[0, 1, 2],
                                                 max_codes=24, render=False)
            for a, b in zip(runs["hf"], runs["static"]):
                assert (a.text_ids, a.codes) == (b.text_ids, b.codes)
                torch.testing.assert_close(torch.tensor(b.text_logprobs), torch.tensor(a.text_logprobs), atol=1e-5, rtol=0)
                torch.testing.assert_close(torch.tensor(b.code_logprobs), torch.tensor(a.code_logprobs), atol=1e-5, rtol=0)
                stopped += len(b.codes) < 24
    assert stopped  # the talker's stop codes end rows early
    policy.decode_engine = "fast"
    with pytest.raises(ValueError, match="does not run Qwen2.5-Omni"):
        omni.sample(omni_prompts()[1], Sampling(max_new_tokens=4), seed=0, max_codes=4, render=False)


def test_the_compiled_step_samples_the_same():
    """rollouts.compile: the step through torch.compile (on a CPU, inductor's C++ kernels), on
    a one-layer Qwen2 to keep the compilation short."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vocalign.model.hf_text import CausalTextLM, text_policy

    tokenizer = make_policy("text").tokenizer
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    policy = text_policy(CausalTextLM(Qwen2ForCausalLM(config).eval()), tokenizer)
    policy.decode_compile = True
    prompts = make_prompts("text")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed compilation warns and runs uncompiled: not here
        compiled = generate(policy, "static", prompts, temperature=1.3)
    assert policy._static.compile
    assert_same_generations(compiled, generate(policy, "fast", prompts, temperature=1.3))


class HostReads(TorchDispatchMode):
    """The ops run inside it that read a tensor's value on the host, or size their output by
    its data: each waits for the device, which a CUDA graph cannot capture."""

    SYNCING = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal", "aten::nonzero",
               "aten::masked_select", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_the_step_reads_nothing_back_to_the_host(tmp_path):
    """What a CUDA graph needs, checked on a CPU: the step of every kind of bucket (plain and
    top-p sampling; Qwen2.5-Omni's recording thinker and its talker with per-step inputs, a
    projection and a code mask) runs without one op that waits for the device's values."""
    with HostReads() as probe:  # the probe sees such a read where there is one
        bool(torch.ones(2).sum() > 1)
    assert probe.seen == ["aten::_local_scalar_dense"]
    policy = make_policy("text")
    prompts = make_prompts("text")
    for sampling in ({"temperature": 1.3}, {"top_p": 0.8}):
        generate(policy, "static", prompts, **sampling)
    omni = OmniSpeech.load(write_tiny_omni(tmp_path, seed=0))
    omni.decode_engine = "static"
    omni.sample(omni_prompts()[0], Sampling(max_new_tokens=6), seed=1, max_codes=8, render=False)
    from vocalign.model.omni_static import decoders

    graphs = [*policy._static._graphs.values(), *(g for d in decoders(omni) for g in d._graphs.values())]
    assert sorted((g.nucleus, g.state.extra is not None, g.state.record is not None) for g in graphs) == [
        (False, False, False), (False, False, True), (False, True, False), (True, False, False)]
    for graph in graphs:
        with HostReads() as probe:
            graph._step()
        assert probe.seen == [], (graph.rows, graph.capacity, graph.nucleus)


def test_bad_use_is_refused_with_the_reason():
    policy = text_lm(policy_under_test("text", False).tokenizer, hidden_act="gelu")
    prompts = make_prompts("text")
    with pytest.raises(ValueError, match="rollouts.engine is 'static'.*gelu.*rollouts.engine: auto"):
        generate(policy, "static", prompts)
    assert StaticDecoder.unsupported(make_policy("text").model) is None
    policy = make_policy("text")
    policy.decode_engine = "auto"  # on a CPU: the fast decoder
    assert isinstance(policy.decoder_for_sampling(), FastDecoder)
    batch = policy.encode_prompts(prompts)
    policy.decode_engine = "static"
    with pytest.raises(ValueError, match=f"at most {MAX_STOPS}"):
        policy.generate(batch, n=1, sampling=Sampling(max_new_tokens=4), stop_ids=list(range(MAX_STOPS)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here: the CUDA-graph case runs in bench/gpu_check.sh")
@pytest.mark.parametrize("kind", ["embedded", "text"])
def test_on_cuda_the_step_is_a_graph_that_follows_the_weights(kind):
    """Captured once, replayed: the same tokens as the fast decoder (float32, TF32 off), and
    after an update of the adapters the same graph samples from the new weights."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    policy = policy_under_test(kind, lora=True)
    policy.model.to("cuda")
    prompts = make_prompts(kind)
    static = generate(policy, "auto", prompts, temperature=1.3)  # auto on CUDA: the static decoder
    assert isinstance(policy._static, StaticDecoder) and all(captured for *_, captured in policy._static.graphs)
    assert_same_generations(static, generate(policy, "fast", prompts, temperature=1.3))
    graphs = policy._static.graphs
    randomise_lora(policy, seed=3)
    after = generate(policy, "static", prompts, temperature=1.3)
    assert policy._static.graphs == graphs  # nothing captured again
    assert_same_generations(after, generate(policy, "fast", prompts, temperature=1.3))
    assert [g.response_ids for g in after] != [g.response_ids for g in static]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here: the CUDA-graph case runs in bench/gpu_check.sh")
def test_on_cuda_qwen2_5_omni_samples_through_graphs(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    omni = OmniSpeech.load(write_tiny_omni(tmp_path, seed=0)).to("cuda")
    prompt, sampling = omni_prompts()[0], Sampling(temperature=1.5, max_new_tokens=8)
    runs = {}
    for engine in ("auto", "hf"):  # auto on CUDA: the static decoder
        omni.decode_engine = engine
        runs[engine] = omni.sample_group(prompt, sampling, seed=3, indices=[0, 1, 2], max_codes=24, render=False)
    for a, b in zip(runs["hf"], runs["auto"]):
        assert (a.text_ids, a.codes) == (b.text_ids, b.codes)
        torch.testing.assert_close(torch.tensor(b.code_logprobs), torch.tensor(a.code_logprobs), atol=1e-5, rtol=0)
    from vocalign.model.omni_static import decoders

    assert all(captured for decoder in decoders(omni) for *_, captured in decoder.graphs)
