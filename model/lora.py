"""LoRA's forward with the adapter's add fused into its matmul.

peft computes a LoRA linear layer as `base(x) + lora_B(lora_A(x)) * scaling`: the
adapter's output [N, out] is written, scaled into a second tensor, then added into a
third. With `torch.addmm(base(x), lora_A(x), B^T, alpha=scaling)` the scaling and the add
happen inside the matmul, and the backward skips the scaling pass too. Same values
(float rounding aside), same parameters, same state dict; measured on the TRL benchmark's
model, the LoRA training forward is about 20% faster (see BENCHMARKS.md).

It plugs into peft through its LoRA-variant hook (`LoraLayer.lora_variant`, the mechanism
DoRA uses), on layers that are plain LoRA `Linear`s; merging (`merge_and_unload`, the
export) stays peft's vanilla merge. `fuse_lora(model)` returns how many layers it fused;
`unfuse_lora(model)` undoes it.
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLoRA:
    """Plain LoRA, with `scaling * lora_B(lora_A(x))` accumulated into the base output by addmm.

    The static methods are those of peft's `LoraVariant` interface (peft imports are kept
    out of this module's import, so importing vocalign's model code stays fast)."""

    def supports_lora_conversion(self) -> bool:
        return True

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        a = module.lora_A[active_adapter].weight  # [r, in]
        b = module.lora_B[active_adapter].weight  # [out, r]
        low = torch.nn.functional.linear(module.lora_dropout[active_adapter](x), a)
        if low.dtype != result.dtype or b.dtype != result.dtype:  # mixed precision: peft's own arithmetic
            return result + (low @ b.t().to(low.dtype)).to(result.dtype) * module.scaling[active_adapter]
        shape = result.shape
        out = torch.addmm(result.reshape(-1, shape[-1]), low.reshape(-1, low.shape[-1]), b.t(), alpha=module.scaling[active_adapter])
        return out.view(shape)


def _lora_linear() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # no peft: nothing to fuse
        return None
    return Linear


def _fusable(module: nn.Module, adapter: str, lora_linear: type | None) -> bool:
    return (
        lora_linear is not None
        and isinstance(module, lora_linear)
        and isinstance(getattr(module, "lora_variant", None), dict)
        and adapter in module.lora_A
        and adapter not in module.lora_variant  # DoRA or another variant: leave it
        and not getattr(module, "fan_in_fan_out", False)
        and not module.lora_bias.get(adapter, False)
        and isinstance(module.get_base_layer(), nn.Linear)
    )


def fuse_lora(model: nn.Module, adapter: str = "default") -> int:
    """Compute `adapter`'s plain LoRA linear layers in `model` with `FusedLoRA`; returns how many."""
    n, lora_linear = 0, _lora_linear()
    for module in model.modules():
        if _fusable(module, adapter, lora_linear):
            module.lora_variant[adapter] = FusedLoRA()
            n += 1
    return n


def unfuse_lora(model: nn.Module, adapter: str = "default") -> int:
    """Back to peft's own LoRA forward; returns how many layers changed."""
    n = 0
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if isinstance(variants, dict) and isinstance(variants.get(adapter), FusedLoRA):
            del variants[adapter]
            n += 1
    return n


# The linear layers a LoRA adapter wraps by default: attention and MLP projections of a Qwen2-style LM.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def attach_lora(lm: nn.Module, r: int, alpha: int, dropout: float = 0.0, target_modules: list[str] | None = None) -> nn.Module:
    """`lm` wrapped in peft LoRA adapters (only they train), their add fused into the matmul."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules or LORA_TARGETS))
    lm = get_peft_model(lm, config)
    fuse_lora(lm)
    return lm
