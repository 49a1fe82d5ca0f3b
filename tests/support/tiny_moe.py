"""A tiny Megatron MoE GPT for CPU tests: the tiny GPT with every MLP an MoE layer (4 experts,
top-2, moe_ffn 32, SwiGLU), the all-to-all dispatcher, no aux loss.

Base weights depend on the expert-parallel layout when Megatron draws them (EP ranks build
fewer experts, which shifts the RNG stream of everything after), so `redraw_base` redraws every
base parameter from its *canonical* name (expert weights by global expert index, the same name
for SequentialMLP and TEGroupedMLP, TE norm names mapped to the local spec's) over its full
shape, and keeps this rank's shard: every layout, and both expert implementations, then hold
the same model.
"""

from __future__ import annotations

import re
import zlib

import torch

from support import tiny_gpt

EXPERTS = 4
TOPK = 2
MOE_FFN = 32


def transformer_config(**overrides):
    from megatron.core import parallel_state

    fields = dict(
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
        moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
    )
    fields.update(overrides)
    return tiny_gpt.transformer_config(**fields)


def block_spec(config, te: bool = False):
    """megatron-core's MoE decoder block spec: SequentialMLP experts on the local spec, TE
    grouped experts (`moe_grouped_gemm=True`) or TE SequentialMLP ones on the TE spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(config, use_transformer_engine=te)


def build(spec, config, seed: int = 0):
    model = tiny_gpt.build_gpt(spec, seed=seed, config=config)
    redraw_base(model)
    return model


_SEQUENTIAL = re.compile(r"\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_GROUPED = re.compile(r"\.experts\.(linear_fc[12])\.weight(\d+)$")


def _expert_offset() -> int:
    from megatron.core import parallel_state

    per_rank = EXPERTS // parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * per_rank


def canonical_name(name: str) -> tuple[str, str | None]:
    """(the layout-free name of a base parameter, `linear_fc1`/`linear_fc2` for an expert
    weight else None)."""
    name = tiny_gpt.te_to_local_name(name.removeprefix("module.").removeprefix("module."))
    match = _SEQUENTIAL.search(name)
    if match:
        index, fc = int(match.group(1)) + _expert_offset(), match.group(2)
        return f"{name[:match.start()]}.experts.{fc}.weight{index}", fc
    match = _GROUPED.search(name)
    if match:
        fc, index = match.group(1), int(match.group(2)) + _expert_offset()
        return f"{name[:match.start()]}.experts.{fc}.weight{index}", fc
    return name, None


@torch.no_grad()
def redraw_base(model) -> None:
    from megatron.core import parallel_state

    from lora_common.state import is_lora_parameter
    from megatron_lora.layers import sharding

    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            continue
        canonical, expert_fc = canonical_name(name)
        if expert_fc is None:
            group = parallel_state.get_tensor_model_parallel_group()
            split = getattr(param, "tensor_model_parallel", False)
            dim, stride = getattr(param, "partition_dim", -1), getattr(param, "partition_stride", 1)
        else:  # by name: TE marks a grouped fc2 weight partition_dim 0 under explicit comm
            group = parallel_state.get_expert_tensor_parallel_group()
            split, dim, stride = True, (0 if expert_fc == "linear_fc1" else 1), (
                2 if expert_fc == "linear_fc1" else 1)
        world, rank = sharding.group_size_rank(group)
        shape = list(param.shape)
        if split:
            shape[dim] *= world
        generator = torch.Generator().manual_seed(zlib.crc32(canonical.encode()))
        full = torch.randn(shape, generator=generator) * 0.1
        if "norm" in canonical:
            full = 1.0 + 0.1 * full
        if split and world > 1:
            full = sharding.shard(full, dim, rank, world, stride)
        param.copy_(full)


def record_routing(model) -> dict[int, int]:
    """Hooks counting the tokens each global expert receives (this rank's experts): returns the
    dict the counts accumulate in, `{(layer number, global expert): tokens}`."""
    counts: dict = {}
    offset = _expert_offset()
    for layer in model.decoder.layers:
        def hook(module, args, number=layer.layer_number):
            for i, tokens in enumerate(args[1].tolist()):
                counts[(number, offset + i)] = counts.get((number, offset + i), 0) + tokens
        layer.mlp.experts.register_forward_pre_hook(hook)
    return counts
