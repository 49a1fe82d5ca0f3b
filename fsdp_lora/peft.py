"""PEFT adapters in and out of a (possibly FSDP-wrapped) `fsdp_lora` model.

The file format lives in `lora_common.peft_files`; this module only gathers the factors out
of the model (one at a time) and scatters them back in (every rank keeps its own shard).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from fsdp_lora.full_params import copy_full_value_, full_value, owned_modules
from fsdp_lora.layers.linear import LoRALinear
from fsdp_lora.model import lora_modules
from lora_common.peft_files import (
    ADAPTER_CONFIG_FILE,
    adapter_config_dict,
    adapter_tensor_key,
    read_peft_adapter,
    write_peft_adapter,
)
from lora_common.state import require_state


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _model_name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike, *,
                      task_type: str | None = "CAUSAL_LM",
                      base_model_name_or_path: str | None = None) -> None:
    """Write the model's adapters as a PEFT adapter folder that `peft.PeftModel.from_pretrained`
    (and vLLM / SGLang) load. Under FSDP every rank must call it: the factors are gathered one
    at a time, rank 0 writes, and all ranks return once the files exist."""
    layers = lora_modules(model)
    require_state(layers, "save_peft_adapter", model=model)
    config = next(iter(layers.values())).lora_config
    writer = _is_writer()
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plain_linears: list[str] = []
    for name, module, _ in owned_modules(model):
        if isinstance(module, LoRALinear):
            pair = (full_value(module.lora_A.weight), full_value(module.lora_B.weight))
            if writer:
                adapters[name] = tuple(t.to("cpu", copy=True) for t in pair)
        elif isinstance(module, nn.Linear):
            plain_linears.append(name)
    if writer:
        targets = {name.rsplit(".", 1)[-1] for name in adapters}
        # PEFT adapts every linear whose leaf name is a target; name the ones we left out.
        skipped = [name for name in plain_linears if name.rsplit(".", 1)[-1] in targets]
        adapter_config = adapter_config_dict(
            config, targets, exclude_modules=skipped, task_type=task_type,
            base_model_name_or_path=base_model_name_or_path or _model_name_or_path(model))
        write_peft_adapter(directory, adapter_config, adapters)
    if dist.is_initialized():
        dist.barrier()


def _check_fits(layers: dict[str, LoRALinear], adapter) -> None:
    where = adapter.weights_file
    missing = sorted(set(layers) - set(adapter.adapters))
    if missing:
        raise ValueError(f"{where}: no adapter for {len(missing)} LoRA module(s) of the model, "
                         f"e.g. {adapter_tensor_key(missing[0], 'A')}")
    unexpected = sorted(set(adapter.adapters) - set(layers))
    if unexpected:
        raise ValueError(f"{where}: adapter for {len(unexpected)} module(s) the model has no "
                         f"LoRA on, e.g. {adapter_tensor_key(unexpected[0], 'A')}")
    for name, layer in layers.items():
        r = layer.lora_config.r
        if (adapter.r, adapter.scaling) != (r, layer.lora_scaling):
            raise ValueError(
                f"{adapter.directory / ADAPTER_CONFIG_FILE}: r={adapter.r}, "
                f"lora_alpha={adapter.alpha}, use_rslora={adapter.use_rslora} (scaling "
                f"{adapter.scaling:g}) but {name} was built with r={r}, scaling "
                f"{layer.lora_scaling:g}; build the model with "
                f"read_peft_adapter(dir).lora_config()")
        lora_a, lora_b = adapter.adapters[name]
        for factor, tensor, expected in (("A", lora_a, (r, layer.in_features)),
                                         ("B", lora_b, (layer.out_features, r))):
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{where}: {adapter_tensor_key(name, factor)} has shape "
                                 f"{list(tensor.shape)}, but {name} needs {list(expected)}: "
                                 f"the adapter was made for another model geometry")


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT adapter folder (PEFT's own or `save_peft_adapter`'s) into the model's LoRA
    factors. Everything is checked before anything is written: the adapter must cover
    exactly the model's LoRA modules with the same r, scaling and shapes. Under FSDP every
    rank reads the (small) files and keeps its own shard."""
    layers = lora_modules(model)
    # Loading into a merged model would leave the old delta inside W.
    require_state(layers, "load_peft_adapter", merged=False, model=model)
    adapter = read_peft_adapter(directory)
    _check_fits(layers, adapter)
    for name, module, _ in owned_modules(model, writeback=True):
        if isinstance(module, LoRALinear):
            lora_a, lora_b = adapter.adapters[name]
            copy_full_value_(module.lora_A.weight, lora_a.to(module.lora_A.weight.dtype))
            copy_full_value_(module.lora_B.weight, lora_b.to(module.lora_B.weight.dtype))
    return model
