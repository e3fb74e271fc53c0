"""LoRA with its add fused into the matmul (`vocalign.model.lora`) against peft's own LoRA
forward: the same outputs, gradients and merged weights, on the embedded model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vocalign.data.tasks import make_task
from vocalign.model.loading import embedded_policy
from vocalign.model.lora import FusedLoRA, fuse_lora, unfuse_lora
from vocalign.model.policy import Sampling


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def lora_policy(dropout: float = 0.0):
    policy = embedded_policy(seed=0)
    policy.enable_lora(r=4, alpha=8, dropout=dropout)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def fused_layers(model) -> int:
    return sum(isinstance(getattr(m, "lora_variant", {}).get("default"), FusedLoRA) for m in model.modules())


def test_enable_lora_fuses_every_adapted_projection():
    policy = lora_policy()
    layers = policy.model.lm.config.num_hidden_layers
    assert fused_layers(policy.model) == 7 * layers  # q, k, v, o, gate, up, down in every layer
    assert unfuse_lora(policy.model) == 7 * layers and fused_layers(policy.model) == 0
    assert fuse_lora(policy.model) == 7 * layers


def test_fused_forward_and_gradients_equal_pefts():
    policy = lora_policy()
    prompts = make_task("arithmetic", 3, seed=2)
    batch = policy.encode_prompts(prompts)
    gens = policy.generate(batch, n=2, sampling=Sampling(max_new_tokens=10, temperature=1.2), seed=1)
    seq = policy.sequences([batch.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                           [batch.encoded[g.prompt_index] for g in gens])
    results = {}
    for fused in (True, False):
        (fuse_lora if fused else unfuse_lora)(policy.model)
        assert fused_layers(policy.model) == (7 * policy.model.lm.config.num_hidden_layers if fused else 0)
        policy.model.zero_grad()
        logp, _ = policy.logprobs_and_entropy(seq)
        (logp.sum() / seq.response_mask.sum()).backward()
        results[fused] = (logp.detach(), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=0)
    assert results[True][1].keys() == results[False][1].keys() and any("lora_A" in n for n in results[True][1])
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_still_applies_in_training():
    policy = lora_policy(dropout=0.5)
    policy.model.train()
    layer = next(m for m in policy.model.modules() if isinstance(getattr(m, "lora_variant", {}).get("default"), FusedLoRA))
    x = torch.randn(4, layer.in_features)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(4)
    b = layer(x)
    assert not torch.allclose(a, b)  # different dropout masks
    policy.model.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_merging_a_fused_adapter_gives_pefts_merged_weights():
    policy = lora_policy()
    fused = copy.deepcopy(policy.model.lm).merge_and_unload()
    unfuse_lora(policy.model)
    plain = copy.deepcopy(policy.model.lm).merge_and_unload()
    for (name, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_other_lora_variants_are_left_alone():
    policy = embedded_policy(seed=0)
    lm = get_peft_model(policy.model.lm, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    assert fuse_lora(lm) == 0  # DoRA keeps its own forward
