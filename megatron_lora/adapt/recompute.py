"""Adapters inside Megatron's activation recompute get their gradient.

Megatron recomputes a region (full: a chunk of transformer layers, `TransformerBlock.
_checkpointed_forward`, or an MTP layer; selective: `mlp`, `moe`, `shared_experts`, `mla_up_proj`,
`moe_act`, `layernorm`, `core_attn`) in a reentrant autograd function that runs its forward
without grad (`tensor_parallel.CheckpointFunction`, `CheckpointWithoutOutput`, TE's
`checkpoint`). Autograd calls that function's backward, which recomputes the region and reaches
the parameters inside, only if some *tensor input* of the region requires grad; parameters inside
do not count. A LoRA model's embedding is frozen, so the decoder's input requires no grad: every
adapter inside a recomputed region is cut off, the loss is detached (full recompute) or the
region's adapters are skipped (selective), and nothing says so.

The guard is a forward pre-hook on each decoder stack that holds LoRA (a module with a
`ModuleList` of layers and a `hidden_states` input: `TransformerBlock`, the MTP block): when the
stack recomputes, trains and runs with grad, and its `hidden_states` requires none, the hook
passes on a detached alias that does (same storage, no copy). Every activation in the stack then
descends from a tensor that requires grad, so every recomputed region inside has such an input,
whatever the granularity, method, layer count or module list. The price is the first layer's
input gradient, computed and dropped: about 1/L of the backward's dgrad work, only under
recompute. Pipeline stages after the first receive an input that already requires grad
(Megatron's p2p buffers), which the hook leaves alone.

Every route that builds LoRA installs it: the post-hoc route on the model it converts
(`guard_stacks`), the spec route when a stack is handed its LoRA layers. A layer never sees its
parent and the spec route never sees the model, so for the spec route the first LoRA layer
built registers a module-registration hook (`watch_for_stacks`) that guards any stack assigned a
`ModuleList` holding LoRA; it acts at model construction only and costs nothing in forward.
"""

from __future__ import annotations

import functools
import inspect

import torch

from megatron_lora.layers.registry import is_lora_linear

_GUARD = "_lora_recompute_guard"  # the hook's handle, on a guarded stack


def guard_stacks(model: torch.nn.Module) -> None:
    """Guard every decoder stack of `model` (one chunk) that holds LoRA. Idempotent."""
    for parent in model.modules():
        for child in parent.children():
            if _holds_lora_layers(parent, child):
                _guard(parent)


@functools.cache
def watch_for_stacks() -> None:
    """From now on, guard each stack that is assigned a `ModuleList` holding LoRA (once)."""
    torch.nn.modules.module.register_module_module_registration_hook(_on_registration)


def is_guarded(stack: torch.nn.Module) -> bool:
    return hasattr(stack, _GUARD)


def _on_registration(parent, name, child):
    if child is not None and _holds_lora_layers(parent, child):
        _guard(parent)


def _holds_lora_layers(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return (isinstance(child, torch.nn.ModuleList)
            and _hidden_states_index(type(parent)) is not None
            and any(is_lora_linear(m) for m in child.modules()))


def _guard(stack: torch.nn.Module) -> None:
    if not is_guarded(stack):
        setattr(stack, _GUARD, stack.register_forward_pre_hook(_input_requires_grad,
                                                               with_kwargs=True))


@functools.cache
def _hidden_states_index(cls: type) -> int | None:
    """The position of `hidden_states` among `cls.forward`'s arguments (after self), or None."""
    forward = getattr(cls, "forward", None)
    try:
        names = list(inspect.signature(forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return names.index("hidden_states") if "hidden_states" in names else None


def _input_requires_grad(stack, args, kwargs):
    by_name = "hidden_states" in kwargs
    index = _hidden_states_index(type(stack))
    hidden = kwargs["hidden_states"] if by_name else (args[index] if index < len(args) else None)
    if not (torch.is_tensor(hidden) and hidden.is_floating_point() and not hidden.requires_grad
            and torch.is_grad_enabled() and stack.training and _recomputes(stack)
            and any(p.requires_grad for p in stack.parameters())):
        return None
    hidden = hidden.detach().requires_grad_()
    if by_name:
        return args, {**kwargs, "hidden_states": hidden}
    return (*args[:index], hidden, *args[index + 1:]), kwargs


def _recomputes(stack) -> bool:
    return getattr(getattr(stack, "config", None), "recompute_granularity", None) is not None
