"""`disable_lora`: run the base model without a second copy of its weights.

RL needs the reference policy's log-probs; with LoRA the reference is the base model, which
is the LoRA model with every adapter switched off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from fsdp_lora.parameters import lora_layers


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, `model` computes exactly what its base model computes.

    Contexts nest (the inner exit restores the outer's state), and the previous state comes
    back when the block raises. Merged adapters live inside the base weights, so a merged
    model cannot be disabled: unmerge first.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"disable_lora: {type(model).__name__} has no LoRA adapters")
    merged = [layer.lora_name for layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"disable_lora: {merged[0]!r} is merged into its base weight; "
                           f"call unmerge_lora_weights first")
    previous = [layer.lora_enabled for layer in layers]
    for layer in layers:
        layer.lora_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.lora_enabled = enabled
