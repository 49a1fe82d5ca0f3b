"""`LoRALinear`: an `nn.Linear` plus a low-rank update, `y = x W^T + b + s * (x A^T) B^T`.

It is a subclass, not a wrapper: the base keeps its names (`q_proj.weight`, `q_proj.bias`), so
HF checkpoints and converters see the model they know; the adapter adds `q_proj.lora_A.weight`
[r, in] and `q_proj.lora_B.weight` [out, r], PEFT's names and shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_lora.layers.factor import LoRAFactor
from fsdp_lora.layers.functional import lora_linear
from lora_common.config import LoRAConfig
from lora_common.delta import lora_delta
from lora_common.state import LoRAState


class LoRALinear(LoRAState, nn.Linear):
    """Linear layer with a LoRA adapter.

    Args:
        in_features, out_features, bias, device, dtype: as `nn.Linear`.
        config: the adapter's `LoRAConfig` (r, scaling, dropout, A's init and seed).
        name: the qualified HF module name; with `config.seed` it fixes A's initial values.

    Shapes: input `[..., in]`, output `[..., out]`; `lora_A.weight` `[r, in]`,
    `lora_B.weight` `[out, r]` (zero at init, so the layer starts equal to its base).

    States (`lora_common.state`): `lora_merged` (the update lives inside `weight`; the forward
    is the base GEMM alone) and `lora_disabled` (inside `disable_lora`: the forward is the base
    layer's); `lora_active` is True when neither holds and the adapter branch runs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: LoRAConfig, name: str, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapter(config, name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig, name: str) -> LoRALinear:
        """A LoRA layer that takes over `linear`'s own weight and bias Parameters (no copy, so
        device, dtype, meta-ness and requires_grad carry over)."""
        layer = cls.__new__(cls)
        # nn.Linear.__init__ on meta allocates nothing; the Parameters are replaced right after.
        nn.Linear.__init__(layer, linear.in_features, linear.out_features,
                           bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        layer._add_adapter(config, name)
        return layer

    def _add_adapter(self, config: LoRAConfig, name: str) -> None:
        self.lora_config, self.lora_name = config, name
        self.lora_scaling = config.scaling
        place = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = LoRAFactor(config.r, self.in_features, role="A", config=config,
                                 name=name, **place)
        self.lora_B = LoRAFactor(self.out_features, config.r, role="B", config=config,
                                 name=name, **place)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.lora_merged = False
        self.lora_disabled = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_active:
            return F.linear(x, self.weight, self.bias)
        # Work on a 2-D [tokens, in] view; the base GEMM writes the only [tokens, out] tensor
        # and the update is accumulated into it (addmm_ with alpha=s: no elementwise pass).
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        if self._fused_path_applies(x2d):
            out = lora_linear(x2d, self.weight, self.bias, lora_a, lora_b, self.lora_scaling)
        else:  # dropout, autocast or mixed dtypes: the same math from ordinary ops
            out = F.linear(x2d, self.weight, self.bias)
            lora_in = x2d if self.lora_dropout is None else self.lora_dropout(x2d)
            hidden = F.linear(lora_in.to(lora_a.dtype), lora_a)                # [tokens, r]
            out.addmm_(hidden.to(out.dtype), lora_b.to(out.dtype).t(), alpha=self.lora_scaling)
        return out.view(*lead, self.out_features)

    def _fused_path_applies(self, x2d: torch.Tensor) -> bool:
        dtypes = {x2d.dtype, self.weight.dtype, self.lora_A.weight.dtype, self.lora_B.weight.dtype}
        if self.bias is not None:
            dtypes.add(self.bias.dtype)
        return (self.lora_dropout is None or not self.training) and len(dtypes) == 1 \
            and not torch.is_autocast_enabled(x2d.device.type)

    def lora_delta(self) -> torch.Tensor:
        """`s * B @ A` in fp32, [out, in] (an unsharded layer's; FSDP merges go through
        `fsdp_lora.merge`, which gathers what it needs)."""
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.lora_scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_config.r}, scaling={self.lora_scaling:g}"
