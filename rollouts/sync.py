"""Weight sync between the trainer and its rollout workers: snapshots, checksums, errors.

A remote worker is built once from a *snapshot* of the trainer's policy (the whole
`Policy` object, LoRA wrappers included, serialised with `torch.save`) and then kept
current by *syncs*: the trainer's trainable state (only the adapter under LoRA) stamped
with a version. `state_checksum` is how both sides prove they hold the same tensors:
the trainer hashes what it sent, each worker hashes what it holds, and the two must
agree bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import io

import torch

from vocalign.model.policy import Policy


class WeightSyncError(RuntimeError):
    """A rollout worker's weights are not the trainer's (wrong version or checksum)."""


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, whatever its dtype (bfloat16 has no numpy dtype)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """A hex blake2b digest of a state dict: names, dtypes, shapes and bytes, in name order.

    Deterministic across processes and machines for the same tensors, and it changes
    with any bit of any tensor, a renamed key or a changed dtype. The trainer and every
    worker compute it the same way, so equal digests mean equal weights.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        tensor = state[name]
        header = f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        data = _tensor_bytes(tensor)
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """The size of one copy of a state dict's tensors, in bytes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def live_state(policy: Policy, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The policy's current values of the synced tensors, without copying them.

    `names` are the keys of the last state the worker loaded (None: the policy's own
    trainable state). Reading them from the model, rather than keeping the received
    dict, means the checksum sees what generation actually uses.
    """
    if policy.lora:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(policy.adapter_model())
    else:
        state = policy.model.state_dict()
        if names is None:
            trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
            names = [n for n in state if n in trainable]
    if names is None:
        return dict(state)
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"the worker's policy has no tensors named {missing[:5]}; was it built from the trainer's policy?")
    return {n: state[n] for n in names}


def snapshot_policy(policy: Policy) -> bytes:
    """The policy (model, LoRA adapters, tokenizer, detokenizer) as bytes, to build a replica.

    `torch.save` writes tensors from any device; `restore_policy` maps them to the
    worker's device. The KL reference copy of a full-weight policy is left out: workers
    only generate.
    """
    shallow = copy.copy(policy)
    shallow._reference = None
    buffer = io.BytesIO()
    torch.save(shallow, buffer)
    return buffer.getvalue()


def restore_policy(snapshot: bytes, device: str | torch.device = "cpu") -> Policy:
    """The policy `snapshot_policy` saved, on `device`."""
    policy = torch.load(io.BytesIO(snapshot), map_location=device, weights_only=False)
    if not isinstance(policy, Policy):
        raise TypeError(f"a policy snapshot holds a {type(policy).__name__}, not a Policy; make it with snapshot_policy")
    policy.model.to(device)
    return policy
