"""`LoRAFactor`: one of the two small matrices of a LoRA adapter, with its own seeded init.

A factor is a module holding one `weight` (so its state-dict key is `...lora_A.weight`, as
PEFT names it) and no forward: `LoRALinear` uses the weights directly. It is deliberately
not an `nn.Linear`, so HuggingFace's `_init_weights` (which re-draws every `nn.Linear`) can
never overwrite a zero B with noise.

Initialization is the factor's own business, so every way torch materializes a module built
on the meta device reaches it:

- `model.to_empty(device=...)` (FSDP2's deferred init): `_apply` notices the weight left the
  meta device and draws it right there, inside the `to_empty` call;
- FSDP1's `param_init_fn`-less materialization calls `reset_parameters()` on every module
  that owns parameters, each for its own parameters only, as torch's contract says;
- `reset_parameters()` by hand.

A is drawn on the CPU by `lora_common.init.initial_lora_A` (the Megatron backend's draw too),
from a generator seeded by `(config.seed, qualified module name)`: every rank, every world
size and every device draws the same values with no broadcast, and the global RNG (which
base-model init uses) is never touched. B starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from fsdp_lora.full_params import copy_full_value_
from lora_common.config import LoRAConfig
from lora_common.init import initial_lora_A

ROLES = ("A", "B")


class LoRAFactor(nn.Module):
    """`weight` [rows, cols]: A (`role="A"`) is [r, in], B (`role="B"`) is [out, r].

    `name` is the qualified HF name of the adapted linear (`model.layers.0.self_attn.q_proj`);
    with `config.seed` it fixes A's values.
    """

    def __init__(self, rows: int, cols: int, *, role: str, config: LoRAConfig, name: str,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"{name}: LoRA factor role must be one of {ROLES}, got {role!r}")
        self.role, self.config, self.name = role, config, name
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))
        if not self.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        rows, cols = self.weight.shape
        if self.role == "A":
            value = initial_lora_A(self.config, cols, self.name)
        else:
            value = torch.zeros(rows, cols)
        copy_full_value_(self.weight, value)

    def _apply(self, fn, recurse=True):
        # `to_empty` and FSDP1 materialization pass through here: init on leaving meta.
        was_meta = self.weight.is_meta
        module = super()._apply(fn, recurse)
        if was_meta and not self.weight.is_meta:
            self.reset_parameters()
        return module

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        init = self.config.init if self.role == "A" else "zeros"
        return f"{rows}, {cols}, init={init}"
