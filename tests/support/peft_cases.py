"""Rank-side cases for test_peft_interop.py: a Megatron GPT converted from a small random HF
Llama, LoRA-trained at TP=2 and exported; PEFT adapters imported at TP=1 and TP=2."""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import hf_llama, lora_helpers
from support.outcomes import outcome

CONFIG = LoRAConfig(r=4, alpha=8)
STEPS = 3


def hf_model(model_type: str = "llama"):
    return hf_llama.build_hf_model(hf_llama.hf_config(model_type), seed=0)


def cross_entropy_loss(model, step: int) -> torch.Tensor:
    ids = hf_llama.tokens(seed=100)  # one batch, fitted for a few steps: the loss must fall
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    labels = torch.roll(ids, -1, dims=1)
    return model(ids, positions, None, labels=labels).float().mean()


def train_and_export(out_dir: str, model_type: str):
    """At TP=2: LoRA on the converted GPT, 3 Adam steps, then export to PEFT (live) and save an
    adapter checkpoint; our logits come back for the oracle comparison."""
    from megatron_lora import (
        export_peft_adapter,
        gather_peft_adapter,
        lora_spec,
        mark_only_lora_as_trainable,
        save_lora_checkpoint,
    )

    hf = hf_model(model_type)
    spec = lora_spec(hf_llama.local_spec(hf.config), CONFIG)
    model = hf_llama.gpt_from_hf(hf, spec).train()
    mark_only_lora_as_trainable(model)
    losses = lora_helpers.train_with_megatron_ddp(model, model.config, steps=STEPS,
                                                     lr=2e-2, loss_fn=cross_entropy_loss)
    model.eval()
    export_peft_adapter(model, f"{out_dir}/peft_live", base_model_name_or_path="tiny-llama",
                        architecture=hf.config.architectures[0])
    save_lora_checkpoint(model, f"{out_dir}/adapter.safetensors")
    # What the adapter sync sends: read from a CPU copy of every parameter under slime-style
    # names, no files (rank 0 gets it)
    backup = {f"module.module.{n}": p.detach().clone() for n, p in model.named_parameters()}
    adapter = gather_peft_adapter(backup, model)
    in_memory = None if adapter is None else (adapter.config, adapter.tensors())
    return {"losses": losses, "logits": hf_llama.gpt_logits(model, hf_llama.tokens()),
            "in_memory": in_memory}


def import_and_compare(adapter_dirs: list[str], layouts):
    """Import each PEFT adapter into the converted GPT at each layout (plain model, and a model
    already carrying LoRA of another rank); return our logits."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import get_lora_parameters, import_peft_adapter, lora_spec

    out = {}
    for tp, sp in layouts:
        initialize_model_parallel(tp=tp)
        hf = hf_model()
        for adapter_dir in adapter_dirs:
            plain = hf_llama.gpt_from_hf(hf, sequence_parallel=sp)
            config = import_peft_adapter(plain, adapter_dir)
            resized = hf_llama.gpt_from_hf(hf, lora_spec(hf_llama.local_spec(hf.config), CONFIG),
                                           sequence_parallel=sp)
            import_peft_adapter(resized, adapter_dir)
            out[(tp, sp, adapter_dir)] = {
                "config": config,
                "logits": hf_llama.gpt_logits(plain, hf_llama.tokens()),
                "resized_logits": hf_llama.gpt_logits(resized, hf_llama.tokens()),
                "lora_shapes": {n: tuple(p.shape) for n, p in get_lora_parameters(resized).items()},
            }
    return out


def bad_imports(adapter_dirs: dict[str, str]):
    """Import each bad PEFT adapter (each should raise naming its culprit); return what each
    import did and the model's state before and after."""
    from megatron_lora import get_lora_parameters, import_peft_adapter, lora_spec

    hf = hf_model()
    model = hf_llama.gpt_from_hf(hf, lora_spec(hf_llama.local_spec(hf.config), CONFIG))
    lora_helpers.set_nonzero_B(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    results = {name: outcome((ValueError, FileNotFoundError), import_peft_adapter, model,
                             adapter_dir)
               for name, adapter_dir in adapter_dirs.items()}
    after = {n: p.detach().clone() for n, p in model.state_dict().items() if torch.is_tensor(p)}
    results["state"] = (after, before)
    results["lora_count"] = len(get_lora_parameters(model))
    return results
