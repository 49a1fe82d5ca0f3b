"""The model under HF names, full tensors on every rank: what a merged sync to a rollout engine
carries, or the base an engine is started from (slime's converters do this for slime: gather over
TP, rename, split fused q/k/v and gate/up). For Llama-family GPTs (`interop/hf_params.py`):

    state = hf_state_dict(model)                 # {"model.layers.0.self_attn.q_proj.weight":
                                                 #  W + s B A, ...}
    base = hf_state_dict(model, merged=False)    # the base alone

Each base weight is read through `merged_weights` (this rank's shard of `W + s B A`: merged
before the gather, as the sharding rule requires), all-gathered over TP with the parameter's own
layout, and split into its HF tensors (`hf_mapping.split_target`). Without adapters it is the base.
"""

from __future__ import annotations

import torch

from megatron_lora.interop import hf_mapping
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.hf_params import hf_param
from megatron_lora.layers.sharding import full_value


def hf_state_dict(model, merged: bool = True) -> dict[str, torch.Tensor]:
    """Every rank: `{HF name: full tensor}` of the model (adapters merged in unless `merged` is
    False). Collective over TP."""
    from megatron.core import parallel_state

    from megatron_lora.sync.merged import merged_weights

    params = dict(model.named_parameters())
    view = merged_weights(params, model) if merged else {
        n: p for n, p in params.items() if ".lora_" not in n}
    geometry = Geometry.from_megatron(model.config)
    group = parallel_state.get_tensor_model_parallel_group()
    state = {}
    for name in view:
        full = full_value(view[name].detach(), params[name], group)
        mapping = hf_param(name)
        parts = (hf_mapping.split_target(mapping.target, full, geometry) if mapping.target
                 else (full,))
        state.update(zip(mapping.hf_names, parts, strict=True))
    return state
