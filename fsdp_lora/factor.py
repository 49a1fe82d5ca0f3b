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

A is drawn on the CPU from a `torch.Generator` seeded by `(seed, qualified module name)`:
every rank, every world size and every device draws the same values with no broadcast, and
the global RNG (which base-model init uses) is never touched.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from fsdp_lora.full_params import copy_full_value_

INITS = ("zeros", "kaiming", "gaussian")


def adapter_generator(seed: int, module_name: str) -> torch.Generator:
    """A CPU generator private to one module: same (seed, name), same stream, everywhere."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_factor(shape: tuple[int, int], init: str, seed: int, module_name: str) -> torch.Tensor:
    """The initial value of a factor, fp32 on the CPU.

    `kaiming` is PEFT's default for A (kaiming-uniform with a=sqrt(5): uniform in
    +-1/sqrt(in)); `gaussian` is PEFT's `init_lora_weights="gaussian"` (normal, std 1/r);
    `zeros` is B's init, so a fresh adapter changes nothing.
    """
    value = torch.empty(shape, dtype=torch.float32)
    if init == "zeros":
        return value.zero_()
    generator = adapter_generator(seed, module_name)
    if init == "kaiming":
        return nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    if init == "gaussian":
        return nn.init.normal_(value, std=1.0 / shape[0], generator=generator)
    raise ValueError(f"{module_name}: unknown LoRA init {init!r}; expected one of {INITS}")


class LoRAFactor(nn.Module):
    """`weight` [rows, cols]: A is [r, in], B is [out, r].

    `name` is the qualified HF name of the adapted linear (`model.layers.0.self_attn.q_proj`);
    with `seed` it fixes A's values.
    """

    def __init__(self, rows: int, cols: int, *, init: str, seed: int, name: str,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"{name}: unknown LoRA init {init!r}; expected one of {INITS}")
        self.init, self.seed, self.name = init, seed, name
        self.weight = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))
        if not self.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        copy_full_value_(self.weight, draw_factor(tuple(self.weight.shape), self.init,
                                                  self.seed, self.name))

    def _apply(self, fn, recurse=True):
        # `to_empty` and FSDP1 materialization pass through here: init on leaving meta.
        was_meta = self.weight.is_meta
        module = super()._apply(fn, recurse)
        if was_meta and not self.weight.is_meta:
            self.reset_parameters()
        return module

    def extra_repr(self) -> str:
        rows, cols = self.weight.shape
        return f"{rows}, {cols}, init={self.init}"
