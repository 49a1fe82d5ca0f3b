"""Rank-side cases for test_moe_checkpoints.py: adapter and dist checkpoints of LoRA MoE models
saved at one EP / ETP layout and loaded at another, across expert implementations, and
checkpoints that do not fit (another expert count or layout)."""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import lora_helpers, moe_cases, tiny_gpt


def _model(layout: str, te: bool, expert_layout: str, **overrides):
    sp = moe_cases.use_layout(layout)
    config = LoRAConfig(r=moe_cases.CONFIG.r, alpha=moe_cases.CONFIG.alpha,
                        expert_layout=expert_layout)
    return moe_cases.lora_moe(config, te, sp, **overrides)


def _state(model) -> dict:
    return {"adapters": moe_cases.adapter_full_tensors(model), "logits": tiny_gpt.logits(model)}


def reshard_cases(out_dir: str, te: bool, expert_layout: str, save_at: str, load_at: list[str]):
    """Save both checkpoints at `save_at` (B != 0), load each into a fresh model at every
    layout of `load_at`; the adapters and logits of each."""
    from megatron_lora import (
        load_dist_checkpoint,
        load_lora_checkpoint,
        save_dist_checkpoint,
        save_lora_checkpoint,
    )

    model = _model(save_at, te, expert_layout)
    lora_helpers.set_nonzero_B(model, seed=0, scale=0.1)
    save_lora_checkpoint(model, f"{out_dir}/adapter.safetensors")
    save_dist_checkpoint(model, f"{out_dir}/dist")
    out = {"saved": _state(model)}
    for layout in load_at:
        adapter_model = _model(layout, te, expert_layout)
        load_lora_checkpoint(adapter_model, f"{out_dir}/adapter.safetensors")
        dist_model = _model(layout, te, expert_layout)
        missing = load_dist_checkpoint(dist_model, f"{out_dir}/dist")
        out[layout] = {"adapter": _state(adapter_model), "dist": _state(dist_model),
                       "dist_missing": missing}
    return out


def interchange_cases(out_dir: str):
    """An adapter checkpoint of SequentialMLP experts loaded into TEGroupedMLP experts (same
    names by global expert index), and the refusals of checkpoints that do not fit."""
    from megatron_lora import load_dist_checkpoint, load_lora_checkpoint, save_lora_checkpoint

    sequential = _model("EP1", te=False, expert_layout="per_expert")
    lora_helpers.set_nonzero_B(sequential, seed=0, scale=0.1)
    save_lora_checkpoint(sequential, f"{out_dir}/sequential.safetensors")
    grouped = _model("EP1", te=True, expert_layout="per_expert")
    load_lora_checkpoint(grouped, f"{out_dir}/sequential.safetensors")
    out = {"sequential": _state(sequential), "grouped": _state(grouped)}

    def refused(model, load):
        before = moe_cases.adapter_full_tensors(model)
        try:
            load()
        except ValueError as error:
            after = moe_cases.adapter_full_tensors(model)
            return str(error), all(torch.equal(after[n], t) for n, t in before.items())
        return None, True

    eight = _model("EP1", te=False, expert_layout="per_expert", num_moe_experts=8)
    out["expert_count"] = refused(eight, lambda: load_lora_checkpoint(
        eight, f"{out_dir}/sequential.safetensors"))
    shared = _model("EP1", te=True, expert_layout="shared_outer")
    out["layout"] = refused(shared, lambda: load_lora_checkpoint(
        shared, f"{out_dir}/sequential.safetensors"))
    from megatron_lora import save_dist_checkpoint

    save_dist_checkpoint(sequential, f"{out_dir}/dist")
    out["dist_expert_count"] = refused(eight, lambda: load_dist_checkpoint(
        eight, f"{out_dir}/dist"))
    out["dist_layout"] = refused(shared, lambda: load_dist_checkpoint(shared, f"{out_dir}/dist"))
    return out


def base_only_cases(out_dir: str, stricts: list[str]):
    """A base-only dist checkpoint (a plain MoE model's) loaded into a LoRA MoE model through
    megatron-core's own `dist_checkpointing.load` under `strict`, inside
    `allow_missing_adapters`, then `load_state_dict(strict=False)` as Megatron-LM does: per
    strictness and grouped layout, the missing keys, base and adapters before and after."""
    from megatron.core import dist_checkpointing

    from megatron_lora import allow_missing_adapters, get_lora_parameters, save_dist_checkpoint

    moe_cases.use_layout("EP1")
    plain = moe_cases._plain_moe(te=True, grouped=True)
    save_dist_checkpoint(plain, f"{out_dir}/base")
    out = {"base": {n: p.detach().clone() for n, p in plain.state_dict().items()
                    if isinstance(p, torch.Tensor) and "_extra_state" not in n}}
    for strict, layout in [(s, lay) for s in stricts for lay in ("per_expert", "shared_outer")]:
        model = _model("EP1", te=True, expert_layout=layout)
        with torch.no_grad():  # a base unlike the checkpoint's, so the load has to write it
            for name, param in model.named_parameters():
                if "lora_" not in name:
                    param.add_(1.0)
        adapters = {n: p.detach().clone() for n, p in get_lora_parameters(model).items()}
        with allow_missing_adapters():
            loaded = dist_checkpointing.load(model.sharded_state_dict(), f"{out_dir}/base",
                                             strict=strict)
        if isinstance(loaded, tuple):  # return_* strictness: (state, missing, unexpected)
            loaded = loaded[0]
        result = model.load_state_dict(loaded, strict=False)
        out[strict, layout] = {
            # TE's `_extra_state` (core attention's) is not a tensor the load is about
            "missing": sorted(k for k in result.missing_keys if not k.endswith("_extra_state")),
            "unexpected": list(result.unexpected_keys),
            "adapter_names": sorted(adapters),
            "adapters_before": adapters,
            "adapters_after": {n: p.detach().clone()
                               for n, p in get_lora_parameters(model).items()},
            "base_after": {n: p.detach().clone() for n, p in model.state_dict().items()
                           if n in out["base"]}}
    return out
