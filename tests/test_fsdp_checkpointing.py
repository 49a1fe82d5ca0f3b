"""fsdp_lora under activation checkpointing, with the base (embedding included) frozen: every
way of checkpointing a HF model gives the adapters the grads they get without it.

Reentrant checkpointing recomputes a layer only if some tensor input of it requires grad; the
frozen embedding's output does not. transformers 5 marks it for causal LMs when checkpointing is
enabled, transformers 4.x did not (only for models loaded through its PEFT integration), and
torch's `checkpoint_wrapper` never does: fsdp_lora's guard (`fsdp_lora/recompute.py`) does."""

from __future__ import annotations

import functools

import pytest
import torch

from fsdp_lora import LoRAConfig, apply_lora_to_fsdp_model, get_lora_parameters
from support.fsdp_llama import build_llama, randomize_lora, token_batches

CONFIG = LoRAConfig(r=4, alpha=8)
TOKENS = token_batches(1)[0]


def _hf(reentrant: bool, transformers_4: bool = False):
    def enable(model):
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if transformers_4:  # 4.x registered no input hook for a model without HF's PEFT
            model.disable_input_require_grads()
    return enable


def _torch_wrapper(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                       checkpoint_impl=CheckpointImpl.REENTRANT),
        check_fn=lambda m: isinstance(m, LlamaDecoderLayer))


CHECKPOINTING = {
    "HF reentrant": _hf(reentrant=True),
    "HF non-reentrant": _hf(reentrant=False),
    "HF reentrant, transformers 4.x": _hf(reentrant=True, transformers_4=True),
    "torch checkpoint_wrapper, reentrant": _torch_wrapper,
}


def lora_loss(checkpointing=None, guarded: bool = True):
    """The training loss of a LoRA Llama, only adapters trainable, and its adapters."""
    model = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    randomize_lora(model)
    if not guarded:
        model.get_input_embeddings()._lora_checkpoint_guard.remove()
    if checkpointing is not None:
        checkpointing(model)
    model.train()
    # no KV cache: a layer recomputed by torch's wrapper would append to it twice
    return model(input_ids=TOKENS, labels=TOKENS, use_cache=False).loss, get_lora_parameters(model)


def lora_grads(checkpointing=None) -> dict[str, torch.Tensor | None]:
    """One backward: each adapter's grad."""
    loss, adapters = lora_loss(checkpointing)
    loss.backward()
    return {name: p.grad for name, p in adapters.items()}


@pytest.fixture(scope="module")
def reference():
    grads = lora_grads()
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    return grads


@pytest.mark.parametrize("name", list(CHECKPOINTING))
def test_checkpointed_adapters_get_the_grads_they_get_without_it(reference, name):
    grads = lora_grads(CHECKPOINTING[name])
    assert grads.keys() == reference.keys()
    for param, grad in reference.items():
        assert grads[param] is not None, f"{name}: {param} got no grad"
        torch.testing.assert_close(grads[param], grad, rtol=1e-5, atol=1e-7, msg=param)


@pytest.mark.parametrize("name", ["HF reentrant, transformers 4.x",
                                  "torch checkpoint_wrapper, reentrant"])
def test_without_the_guard_these_train_nothing(name):
    """The control, what the guard prevents: the loss is cut off from every adapter."""
    loss, _ = lora_loss(CHECKPOINTING[name], guarded=False)
    assert not loss.requires_grad


def test_the_guard_leaves_the_embedding_output_alone_without_checkpointing():
    """No checkpointing, eval, or no grad: the first layer's input gradient is not computed."""
    model = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    seen = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(out.requires_grad))
    model.train()
    model(input_ids=TOKENS)
    _hf(reentrant=True, transformers_4=True)(model)
    model(input_ids=TOKENS)
    with torch.no_grad():
        model(input_ids=TOKENS)
    model.eval()
    model(input_ids=TOKENS)
    assert seen == [False, True, False, False]
