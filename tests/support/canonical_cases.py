"""Rank-side cases for test_canonical.py: canonical (per-projection) LoRA on a Megatron GPT
converted from a small random HF Llama, trained with Megatron's DDP at TP=1, TP=2 and TP=2+SP,
then every downstream verb on the TP=2+SP model. Each case returns evidence; the test judges
it against real PEFT (and fsdp_lora) trained in the test process.
"""

from __future__ import annotations

import dataclasses

import torch

from lora_common import LoRAConfig
from support import hf_llama, lora_helpers, peft_cases
from support.outcomes import outcome

CANONICAL = LoRAConfig(r=4, alpha=8, canonical=True)   # all seven projections
QV_ONLY = LoRAConfig(r=4, alpha=8, canonical=True, target_modules=["linear_q", "linear_v"])
COLUMN_ONLY = ["linear_qkv", "linear_fc1"]
LAYOUTS = [(2, False), (2, True), (1, False)]
STEPS = 5
LR = 1e-2


def full_adapters(model) -> dict[str, torch.Tensor]:
    """Every adapter matrix, unsharded, by its name in the unsplit model."""
    from megatron_lora.modules import lora_modules

    return {f"{name}.{key}": lora_helpers.full_tensor(param)
            for name, module in lora_modules(model).items()
            for key, param in module.lora_parameters().items()}


def build(config: LoRAConfig, sp: bool, spec_route: bool = True):
    """The HF Llama's Megatron twin with canonical LoRA (spec or post-hoc route), non-zero B."""
    from megatron_lora import apply_lora_to_megatron_model, lora_spec, mark_only_lora_as_trainable

    hf = peft_cases.hf_model()
    if spec_route:
        model = hf_llama.gpt_from_hf(hf, lora_spec(hf_llama.local_spec(hf.config), config),
                                     sequence_parallel=sp)
    else:
        model = apply_lora_to_megatron_model(hf_llama.gpt_from_hf(hf, sequence_parallel=sp),
                                             config)
    mark_only_lora_as_trainable(model)  # the embedding and output layer too
    lora_helpers.set_nonzero_B(model)
    return model


def train(model):
    """5 Adam steps through Megatron's DDP on the fixed batch; (losses, adapters before, after)."""
    initial = full_adapters(model)
    losses = lora_helpers.train_with_megatron_ddp(model, model.config, steps=STEPS, lr=LR,
                                                  loss_fn=peft_cases.cross_entropy_loss)
    return losses, initial, full_adapters(model.eval())


def training_cases():
    """Canonical LoRA trained at every layout (all seven projections), and q/v only at TP=2+SP."""
    from megatron_cpu.launch import initialize_model_parallel

    out = {}
    for tp, sp in LAYOUTS:
        initialize_model_parallel(tp=tp)
        out[("all", tp, sp)] = train(build(CANONICAL, sp))
    initialize_model_parallel(tp=2)
    out[("qv", 2, True)] = train(build(QV_ONLY, True))
    return out


def structure_cases():
    """At TP=2+SP: parameter names, attributes and count; spec route vs post-hoc route; the
    refusals that need a model."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import get_lora_parameters

    out = {}
    for tp, sp in ((2, True), (1, False)):
        initialize_model_parallel(tp=tp)
        # Dropout first, while the RNG stream is where it is at every TP size: without SP a
        # column target's ranks hold the same tokens, so TP=2 draws TP=1's masks (one per
        # projection). Row targets are left out: their input is a TP shard, whose masks come
        # from the per-rank stream and cannot be TP=1's.
        dropped = build(dataclasses.replace(CANONICAL, dropout=0.3, target_modules=COLUMN_ONLY),
                        sp=False).train()
        dropout_losses = [peft_cases.cross_entropy_loss(dropped, step).item() for step in range(2)]
        spec_model, posthoc = build(CANONICAL, sp), build(CANONICAL, sp, spec_route=False)
        lora = get_lora_parameters(spec_model)
        out[tp] = {
            "names": sorted(lora),
            "attributes": {n: (p.tensor_model_parallel, p.partition_dim, p.partition_stride,
                               getattr(p, "sequence_parallel", False)) for n, p in lora.items()},
            "local_count": sum(p.numel() for p in lora.values()),
            "spec_route": full_adapters(spec_model), "posthoc_route": full_adapters(posthoc),
            "classes": sorted({type(m).__name__ for m in spec_model.modules()
                               if hasattr(m, "lora_scaling")}),
            "dropout": (dropout_losses, peft_cases.cross_entropy_loss(dropped.eval(), 0).item()),
        }
    initialize_model_parallel(tp=2)
    hf = hf_llama.build_hf_model(hf_llama.hf_config("mistral"))  # one kv group: MQA
    out["mqa_tp2"] = outcome(ValueError, _apply, hf_llama.gpt_from_hf(hf), CANONICAL)
    return out


def _apply(model, config):
    from megatron_lora import apply_lora_to_megatron_model

    apply_lora_to_megatron_model(model, config)


def downstream_cases(out_dir: str, qv_peft_dir: str):
    """At TP=2+SP on the trained canonical model: merge, disable, the merged stream (from the
    modules and from a CPU copy of the named tensors, as slime syncs), adapter and dist
    checkpoints into TP=1, PEFT export; and a q/v-only PEFT adapter imported at rank r and
    exported again."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import (
        disable_lora,
        export_peft_adapter,
        import_peft_adapter,
        iter_merged_weights,
        load_dist_checkpoint,
        load_lora_checkpoint,
        merge_lora_weights,
        merged_weights,
        save_dist_checkpoint,
        save_lora_checkpoint,
        unmerge_lora_weights,
    )

    out = {}
    initialize_model_parallel(tp=2)
    model = build(CANONICAL, True)
    lora_helpers.train_with_megatron_ddp(model, model.config, steps=2, lr=LR,
                                         loss_fn=peft_cases.cross_entropy_loss)
    model.eval()
    ids = hf_llama.tokens()
    out["logits"] = hf_llama.gpt_logits(model, ids)
    out["adapters"] = full_adapters(model)
    plain = hf_llama.gpt_from_hf(peft_cases.hf_model(), sequence_parallel=True)
    with disable_lora(model):
        out["disabled"] = (hf_llama.gpt_logits(model, ids), hf_llama.gpt_logits(plain, ids))

    params = dict(model.named_parameters())
    stream = {n: t.clone() for n, t in iter_merged_weights(model)}
    out["stream_full"] = {n: lora_helpers.full_tensor_like(t, params[n]) for n, t in stream.items()}
    cpu_copy = {n: p.detach().clone() for n, p in model.named_parameters()}
    view = merged_weights(cpu_copy, model)
    out["merged_view"] = ({n: view[n] for n in view}, stream)
    out["base_full"] = {n: lora_helpers.full_tensor(p) for n, p in params.items()
                        if ".lora_" not in n}
    merge_lora_weights(model)
    out["merged_logits"] = hf_llama.gpt_logits(model, ids)
    out["merged_params"] = ({n: params[n].detach().clone() for n in stream}, stream)
    unmerge_lora_weights(model)

    save_lora_checkpoint(model, f"{out_dir}/adapter.safetensors")
    save_dist_checkpoint(model, f"{out_dir}/dist")
    export_peft_adapter(model, f"{out_dir}/peft", base_model_name_or_path="tiny-llama")

    initialize_model_parallel(tp=1)
    from_adapter = build(CANONICAL, False)
    load_lora_checkpoint(from_adapter, f"{out_dir}/adapter.safetensors")
    from_dist = build(CANONICAL, False)
    missing = load_dist_checkpoint(from_dist, f"{out_dir}/dist")
    out["tp1_from_adapter"] = (full_adapters(from_adapter), hf_llama.gpt_logits(from_adapter, ids))
    out["tp1_from_dist"] = (full_adapters(from_dist), hf_llama.gpt_logits(from_dist, ids), missing)

    initialize_model_parallel(tp=2)
    imported = hf_llama.gpt_from_hf(peft_cases.hf_model(), sequence_parallel=True)
    config = import_peft_adapter(imported, qv_peft_dir, canonical=True)
    export_peft_adapter(imported, f"{out_dir}/qv_again", base_model_name_or_path="tiny-llama")
    out["qv_import"] = (config, hf_llama.gpt_logits(imported, ids),
                        sorted(n for n, _ in imported.named_parameters() if ".lora_" in n))
    return out
