"""The references canonical LoRA is judged against: real PEFT and fsdp_lora, per-projection
LoRA on the small random HF Llama, trained in the test process exactly as the Megatron twin is
(`peft_cases.cross_entropy_loss`'s batch, torch Adam).

Adapters travel keyed by their Megatron names (`decoder.layers.0.self_attention.linear_qkv.
lora_q.lora_A.weight`), mapped to the HF module with the production mapping
(`megatron_lora.interop.hf_mapping`).
"""

from __future__ import annotations

import torch

from megatron_lora.interop import hf_mapping
from support import hf_llama, peft_cases


def hf_module(megatron_key: str) -> tuple[str, str]:
    """(HF module, factor "A" or "B") of a Megatron adapter tensor name."""
    module, factor = megatron_key.rsplit(".lora_", 1)
    layer, target, projection = hf_mapping.parse_megatron_adapter(module)
    if projection is not None:
        return hf_mapping.hf_projection_module(layer, target, projection), factor[0]
    (name,) = hf_mapping.hf_module_names(layer, target)
    return name, factor[0]


def hf_leaves(megatron_adapters: dict[str, torch.Tensor]) -> list[str]:
    return sorted({hf_module(key)[0].rsplit(".", 1)[1] for key in megatron_adapters})


def _loss(model) -> torch.Tensor:
    ids = hf_llama.tokens(seed=100)  # peft_cases.cross_entropy_loss's batch and labels
    logits = model(input_ids=ids).logits
    labels = torch.roll(ids, -1, dims=1)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))


def _train(model, parameters: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(parameters.values(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _set_and_train(model, named, initial, steps, lr):
    """Copy `initial` (Megatron-named) into `named` (`{(HF module, factor): parameter}`), train,
    and return (losses, final adapters Megatron-named)."""
    keys = {hf_module(key): key for key in initial}
    if set(keys) != set(named):
        raise ValueError(f"adapters differ: {sorted(set(keys) ^ set(named))}")
    with torch.no_grad():
        for where, param in named.items():
            param.copy_(initial[keys[where]])
    losses = _train(model.train(), {str(k): p for k, p in named.items()}, steps, lr)
    return losses, {keys[where]: param.detach().clone() for where, param in named.items()}


def train_peft(initial: dict[str, torch.Tensor], r: int, alpha: float, steps: int, lr: float):
    """Real `peft.get_peft_model` on the HF Llama with one adapter per targeted projection."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(peft_cases.hf_model(), LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=hf_leaves(initial)))
    named = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:  # base_model.model.<module>.lora_A.default.weight
            module, factor = name.removeprefix("base_model.model.").split(".lora_")
            named[(module, factor[0])] = param
    return _set_and_train(model, named, initial, steps, lr)


def train_fsdp_lora(initial: dict[str, torch.Tensor], r: int, alpha: float, steps: int,
                    lr: float):
    """fsdp_lora's `LoRALinear` swap on the HF Llama (one process, no FSDP wrapping)."""
    from fsdp_lora import LoRAConfig, apply_lora_to_fsdp_model, get_lora_parameters

    model = apply_lora_to_fsdp_model(peft_cases.hf_model(), LoRAConfig(
        r=r, alpha=alpha, target_modules=hf_leaves(initial)))
    named = {}
    for name, param in get_lora_parameters(model).items():
        module, factor = name.split(".lora_")
        named[(module, factor[0])] = param
    return _set_and_train(model, named, initial, steps, lr)


def make_peft_adapter(directory, target_modules: list[str], r: int, alpha: float, seed: int = 5):
    """A PEFT adapter saved by real peft for the HF Llama, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(peft_cases.hf_model(), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=target_modules))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(directory))
    return directory
