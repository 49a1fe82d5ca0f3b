"""Adapters inside activation checkpointing get their gradient.

A reentrant checkpoint (HF's `gradient_checkpointing_enable()` with `use_reentrant=True`, the
default of transformers 4.x; torch's `checkpoint_wrapper` with `CheckpointImpl.REENTRANT`) runs
its layer without grad and recomputes it in its backward, which autograd calls only if some
tensor *input* of the layer requires grad; the LoRA parameters inside do not count. With the
embedding frozen, nothing the first layer gets requires grad, and no adapter trains. transformers
5 registers `enable_input_require_grads` itself for causal LMs; 4.x did so only for models
loaded through its PEFT integration, and torch's wrapper never does.

The guard is a forward hook on the input embedding (what `enable_input_require_grads` does),
armed only while the model trains with grad through some checkpointed module and the output
requires no grad: it marks that output (a fresh leaf of the frozen embedding) as requiring grad.
The price is the first layer's input gradient, computed and dropped, under checkpointing only.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

_GUARD = "_lora_checkpoint_guard"  # the hook's handle, on the guarded embedding


def guard_input_embeddings(model: nn.Module) -> None:
    """Install the guard on `model.get_input_embeddings()` (a HF model); a model without one is
    left as it is. Idempotent."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, nn.Module) and not hasattr(embeddings, _GUARD):
        hook = functools.partial(_output_requires_grad, model)
        setattr(embeddings, _GUARD, embeddings.register_forward_hook(hook))


def _output_requires_grad(model, embeddings, args, output) -> None:
    if (torch.is_tensor(output) and output.is_floating_point() and not output.requires_grad
            and torch.is_grad_enabled() and model.training and _checkpoints(model)
            and any(p.requires_grad for p in model.parameters())):
        output.requires_grad_(True)


def _checkpoints(model: nn.Module) -> bool:
    """Whether some module recomputes its forward: HF's `gradient_checkpointing` flag, or torch's
    checkpoint wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return any(getattr(m, "gradient_checkpointing", False) is True
               or isinstance(m, CheckpointWrapper) for m in model.modules())
