"""Rank-side cases for test_moe*.py: LoRA on the tiny MoE GPT (`tiny_moe`) at several
parallel layouts, returning losses and full adapter tensors by checkpoint name for the tests to
judge. No megatron import at module level: TE-emulated cases run with `te_emulation.enable` as
the launcher's setup."""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import lora_helpers, tiny_gpt, tiny_moe

CONFIG = LoRAConfig(r=4, alpha=8)
STEPS = 3

# name -> (initialize_model_parallel sizes, sequence parallel)
LAYOUTS = {
    "EP1": (dict(tp=1), False),
    "EP2": (dict(tp=1, expert_model_parallel_size=2), False),
    "ETP2": (dict(tp=1, expert_tensor_parallel_size=2), False),
    "TP2+SP EP2": (dict(tp=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1), True),
    "TP2+SP ETP2": (dict(tp=2, expert_tensor_parallel_size=2), True),
}
# 4 ranks: the experts split over EP and each expert over ETP at once (the ETP group's ranks
# then hold different tokens: the dispatcher's gathers have unequal pieces)
LAYOUTS_4 = {
    "EP2 ETP2": (dict(tp=1, expert_model_parallel_size=2, expert_tensor_parallel_size=2), False),
    "TP2+SP EP2 ETP2": (dict(tp=2, expert_model_parallel_size=2, expert_tensor_parallel_size=2),
                        True),
}


def use_layout(name: str) -> bool:
    """Initialize the parallel state of a layout; returns its sequence-parallel flag."""
    from megatron_cpu.launch import initialize_model_parallel

    sizes, sp = {**LAYOUTS, **LAYOUTS_4}[name]
    initialize_model_parallel(**sizes)
    return sp


def lora_moe(config: LoRAConfig, te: bool, sp: bool = False, grouped: bool | None = None,
             **overrides):
    """The LoRA MoE GPT of this layout (spec route), base redrawn by canonical name: on the TE
    spec with `te` (grouped experts unless `grouped=False`), else the local spec."""
    from megatron_lora import lora_spec

    moe_config = tiny_moe.transformer_config(
        sequence_parallel=sp, moe_grouped_gemm=te if grouped is None else grouped, **overrides)
    return tiny_moe.build(lora_spec(tiny_moe.block_spec(moe_config, te), config), moe_config)


def adapter_full_tensors(model) -> dict[str, torch.Tensor]:
    """Every adapter matrix, unsharded, by its adapter-checkpoint name (global expert index),
    collected from every rank: the same dict at every layout holding the same adapters."""
    from megatron_lora.layers import sharding
    from megatron_lora.modules import lora_tensors

    mine = {name: sharding.full_tensor(param, module.lora_tp_group)
            for name, (param, module) in lora_tensors(model).items()}
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return {name: t for rank in everyone for name, t in sorted(rank.items())}


def data_parallel_loss(model, step: int) -> torch.Tensor:
    """The tiny GPT's loss on this data-parallel rank's rows of the batch (all rows without
    data parallelism): averaged over DP by DDP, it is the full batch's loss."""
    from megatron.core import parallel_state

    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    # one row per rank at least (4 ranks at TP=1 are 4 data-parallel ranks), the same batch at
    # every layout of a launch
    rows = max(tiny_gpt.BATCH, torch.distributed.get_world_size())
    tokens, positions, labels = (t[rank::dp] for t in tiny_gpt.batch(step, rows))
    return model(tokens, positions, None, labels=labels).float().mean()


def _dp_mean(values: list[float]) -> list[float]:
    from megatron.core import parallel_state

    total = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total / parallel_state.get_data_parallel_world_size()).tolist()


def _routed(counts: dict) -> dict:
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, counts)
    merged: dict = {}
    for rank in everyone:
        for key, tokens in rank.items():
            merged[key] = merged.get(key, 0) + tokens
    return merged


def train_runs(runs: list[tuple[str, str]], te: bool, shared_ffn: int | None = None):
    """For each (layout, expert layout): 3 Adam steps through Megatron's DDP and
    finalize_model_grads (with shared experts of ffn `shared_ffn`, if given); the losses
    (data-parallel mean), the final adapters by checkpoint name and the tokens each global
    expert received. Then, at ETP = 2, the refusal of adapter dropout."""
    from megatron_lora import mark_only_lora_as_trainable

    out = {}
    for name, expert_layout in runs:
        config = LoRAConfig(r=CONFIG.r, alpha=CONFIG.alpha, expert_layout=expert_layout)
        sp = use_layout(name)
        shared = {"moe_shared_expert_intermediate_size": shared_ffn} if shared_ffn else {}
        model = lora_moe(config, te, sp, **shared)
        mark_only_lora_as_trainable(model)
        lora_helpers.set_nonzero_B(model, seed=0, scale=0.1)
        counts = tiny_moe.record_routing(model)
        losses = lora_helpers.train_with_megatron_ddp(model, model.config, steps=STEPS,
                                                      loss_fn=data_parallel_loss)
        out[(name, expert_layout)] = {"losses": _dp_mean(losses),
                                      "adapters": adapter_full_tensors(model),
                                      "routed": _routed(counts)}
    use_layout("ETP2")
    out["dropout_at_etp2"] = _error(lambda: lora_moe(
        LoRAConfig(r=CONFIG.r, dropout=0.1, expert_layout=runs[0][1]), te))
    return out


def four_rank_runs(sequential: list[tuple[str, str]], grouped: list[tuple[str, str]],
                   shared_ffn: int):
    """`train_runs` of SequentialMLP and of TEGroupedMLP (beside shared experts) in one 4-rank
    launch (on the TE emulation, which the local-spec SequentialMLP does not use)."""
    return {"sequential": train_runs(sequential, False),
            "grouped": train_runs(grouped, True, shared_ffn)}


# ----- one rank, on the TE emulation: every expert implementation ---------------------------

# name -> (TE spec, grouped GEMM, expert layout, shared experts' ffn or None): the expert
# implementations LoRA adapts.
SHARED_FFN = 48
IMPLEMENTATIONS = {
    "SequentialMLP": (False, False, "per_expert", None),
    "SequentialMLP (TE linears)": (True, False, "per_expert", None),
    "TEGroupedMLP": (True, True, "per_expert", None),
    "TEGroupedMLP shared_outer": (True, True, "shared_outer", None),
    "SequentialMLP + shared experts": (False, False, "per_expert", SHARED_FFN),
}


def _plain_moe(te: bool, grouped: bool, **overrides):
    moe_config = tiny_moe.transformer_config(moe_grouped_gemm=grouped, **overrides)
    return tiny_moe.build(tiny_moe.block_spec(moe_config, te), moe_config)


def _lora_parameters(model) -> dict[str, torch.Tensor]:
    from megatron_lora import get_lora_parameters

    return {name: p for name, p in get_lora_parameters(model).items() if p.requires_grad}


def implementation_cases():
    """For each expert implementation: base and B = 0 logits, the trainable count, merged and
    unmerged logits, the merged-weight stream against the merge, disable_lora against the base;
    and SequentialMLP against TEGroupedMLP for the same weights (logits, adapter grads)."""
    from megatron_lora import (
        disable_lora,
        iter_merged_weights,
        mark_only_lora_as_trainable,
        merge_lora_weights,
        unmerge_lora_weights,
    )

    use_layout("EP1")
    out = {}
    for name, (te, grouped, layout, shared_ffn) in IMPLEMENTATIONS.items():
        config = LoRAConfig(r=CONFIG.r, alpha=CONFIG.alpha, expert_layout=layout)
        shared = {"moe_shared_expert_intermediate_size": shared_ffn} if shared_ffn else {}
        base = _plain_moe(te, grouped, **shared)
        model = lora_moe(config, te, grouped=grouped, **shared)
        mark_only_lora_as_trainable(model)
        r = {"experts_class": type(model.decoder.layers[0].mlp.experts).__name__,
             "base": tiny_gpt.logits(base), "b0": tiny_gpt.logits(model),
             "trainable": sum(p.numel() for p in _lora_parameters(model).values())}
        lora_helpers.set_nonzero_B(model, seed=0, scale=0.1)
        r["lora"] = tiny_gpt.logits(model)
        with disable_lora(model):
            r["disabled"] = tiny_gpt.logits(model)
        stream = {n: t.clone() for n, t in iter_merged_weights(model)}
        merge_lora_weights(model)
        r["merged"] = tiny_gpt.logits(model)
        merged = dict(model.named_parameters())
        r["stream_equals_merge"] = {n: (stream[n], merged[n].detach().clone()) for n in stream}
        unmerge_lora_weights(model)
        loss = tiny_gpt.loss(model)
        loss.backward()
        r["grads"] = _grads_by_checkpoint_name(model)
        out[name] = r
    return out


def _grads_by_checkpoint_name(model) -> dict[str, torch.Tensor]:
    from megatron_lora.modules import lora_tensors

    return {name: param.grad.clone() for name, (param, _) in lora_tensors(model).items()}


def target_cases():
    """Which linears each target entry adapts, in an MoE model with shared experts and a
    dense first layer (`moe_layer_freq=[0, 1]`)."""
    from megatron_lora import lora_spec
    from megatron_lora.modules import lora_modules

    use_layout("EP1")
    moe_config = tiny_moe.transformer_config(moe_layer_freq=[0, 1],
                                             moe_shared_expert_intermediate_size=48)
    out = {}
    for targets in (["linear_fc1"], ["experts.linear_fc1"], ["shared_experts.linear_fc2"],
                    ["mlp.linear_fc1"], ["linear_proj", "experts.linear_fc2"]):
        spec = lora_spec(tiny_moe.block_spec(moe_config), LoRAConfig(r=4, target_modules=targets))
        model = tiny_moe.build(spec, moe_config)
        out[tuple(targets)] = sorted(lora_modules(model))
    return out


# ----- bad input: named errors, nothing changed ---------------------------------------------

def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def bad_input_cases():
    """Each refusal's message, and whether the model it was given is unchanged."""
    from megatron_lora import apply_lora_to_megatron_model, gpt_lora_spec, lora_spec
    from megatron_lora.modules import lora_modules

    use_layout("EP1")
    out = {}
    moe_config = tiny_moe.transformer_config()
    shared_outer = LoRAConfig(r=4, expert_layout="shared_outer")
    out["shared_outer_spec"] = _error(lambda: lora_spec(tiny_moe.block_spec(moe_config),
                                                        shared_outer))
    plain = _plain_moe(te=False, grouped=False)
    before = tiny_gpt.full_state(plain)
    out["shared_outer_posthoc"] = _error(lambda: apply_lora_to_megatron_model(plain, shared_outer))
    out["posthoc_untouched"] = (not lora_modules(plain), before, tiny_gpt.full_state(plain))
    out["router"] = _error(lambda: apply_lora_to_megatron_model(
        plain, LoRAConfig(r=4, target_modules=["router"])))
    one_expert = LoRAConfig(r=4, exclude_modules=[
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1"])
    out["single_expert_exclude"] = _error(lambda: lora_spec(tiny_moe.block_spec(moe_config),
                                                            one_expert))
    expert_targets = LoRAConfig(r=4, target_modules=["experts.linear_fc1", "linear_qkv"])
    out["experts_on_dense_spec"] = _error(lambda: lora_spec(tiny_gpt.local_spec(), expert_targets))
    dense = tiny_gpt.build_gpt()
    out["experts_on_dense_posthoc"] = _error(lambda: apply_lora_to_megatron_model(dense,
                                                                                 expert_targets))
    out["dense_untouched"] = not lora_modules(dense)
    try:  # megatron-core 0.16's legacy GroupedMLP (0.19 removed it)
        from megatron.core.transformer.moe.experts import GroupedMLP  # noqa: F401
        legacy = tiny_moe.transformer_config(moe_grouped_gemm=True)
        out["legacy_grouped"] = _error(lambda: lora_spec(tiny_moe.block_spec(legacy),
                                                         LoRAConfig(r=4)))
    except ImportError:
        out["legacy_grouped"] = "absent"
    overlap = tiny_moe.transformer_config(moe_shared_expert_intermediate_size=48,
                                          moe_shared_expert_overlap=True)
    out["shared_expert_overlap"] = _error(lambda: gpt_lora_spec(overlap, LoRAConfig(r=4),
                                                                use_transformer_engine=False,
                                                                num_experts=tiny_moe.EXPERTS))
    out["overlap_without_shared_targets"] = _error(lambda: gpt_lora_spec(
        overlap, LoRAConfig(r=4, target_modules=["experts.linear_fc1"]),
        use_transformer_engine=False, num_experts=tiny_moe.EXPERTS))
    # Options of megatron-core 0.19 (absent from 0.16's TransformerConfig: set on the instance).
    for option, value in (("use_transformer_engine_op_fuser", True),
                          ("moe_mlp_glu_interleave_size", 32), ("moe_single_grouped_weight", True)):
        config = tiny_moe.transformer_config()
        setattr(config, option, value)
        out[option] = _error(lambda config=config: gpt_lora_spec(
            config, LoRAConfig(r=4), use_transformer_engine=False, num_experts=tiny_moe.EXPERTS))
    return out
