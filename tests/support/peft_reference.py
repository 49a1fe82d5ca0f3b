"""Real PEFT as the reference: adapters made by real peft (`make_peft_adapter`), the logits real
`PeftModel` computes (`peft_logits`), PEFT folders as written (`read_peft_folder`), and the
references canonical LoRA is judged against: real PEFT and fsdp_lora, per-projection LoRA on the
small random HF Llama, trained in the test process exactly as the Megatron twin is
(`peft_cases.cross_entropy_loss`'s batch, torch Adam).

Adapters travel keyed by their Megatron names (`decoder.layers.0.self_attention.linear_qkv.
lora_q.lora_A.weight`), mapped to the HF module with the production mapping
(`megatron_lora.interop.hf_mapping`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

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


def make_peft_adapter(directory, target_modules: list[str], r: int = 4, alpha: float = 16, *,
                      hf_model=None, seed: int = 5, use_rslora: bool = False) -> Path:
    """A PEFT adapter saved by real peft for `hf_model` (the small HF Llama by default), with
    random non-zero A and B drawn from `seed`."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_model if hf_model is not None else peft_cases.hf_model(),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules,
                                      use_rslora=use_rslora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(directory))
    return Path(directory)


def peft_logits(adapter_dir, hf_model) -> tuple[torch.Tensor, list[str]]:
    """Real `PeftModel.from_pretrained` on `hf_model` with the adapter in `adapter_dir`: its
    logits on `hf_llama.tokens()` and the warnings PEFT gave while loading."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(hf_model, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = hf_llama.hf_logits(model, hf_llama.tokens())
    return logits, [str(w.message) for w in caught]


def read_peft_folder(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT folder as it is on disk: `adapter_config.json` and the tensors under their keys
    (SGLang's shared expert factors left `[1, ...]`, unlike `read_peft_adapter`)."""
    from safetensors.torch import load_file

    folder = Path(path)
    return (json.loads((folder / "adapter_config.json").read_text()),
            load_file(folder / "adapter_model.safetensors"))
