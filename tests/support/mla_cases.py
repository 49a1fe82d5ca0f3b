"""Rank-side cases for test_mla.py and test_mla_interop.py: LoRA on every linear of
multi-latent attention.

- `te_spec_cases` (launcher setup `te_emulation.enable`): megatron-core's TE layer spec with
  MLA, q/kv latent norms fused into the up projections, the down projections duplicated
  `TELinear`s. At TP=2+SP and TP=1 (megatron-core is exact there, see `megatron_1699.py`), then
  TP=2 without SP with the test-only fix for Megatron-LM #1699.
- `deepseek_cases`: the local spec converted from a small random HF DeepSeek-V3, trained,
  exported to PEFT; PEFT adapters made by real peft imported.
"""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import (
    hf_deepseek,
    hf_llama,
    lora_helpers,
    megatron_1699,
    peft_cases,
    tiny_gpt,
    tiny_mla,
)

CONFIG = LoRAConfig(r=4, alpha=8, target_modules=tiny_mla.TARGETS + ("linear_fc1", "linear_fc2"))
TE_LAYOUTS = [(2, True), (1, False), (2, False)]  # (2, False) last: it patches megatron-core
STEPS = 3


def full_adapters(model) -> dict[str, torch.Tensor]:
    from megatron_lora import get_lora_parameters

    return lora_helpers.full_state(get_lora_parameters(model))


def te_spec_cases(out_dir: str):
    """Per layout: split kinds, attributes, B = 0, both routes, grads, 3 Adam steps, merge. The
    TP=2+SP model saves an adapter and a dist checkpoint, which TP=1 models load."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import (
        apply_lora_to_megatron_model,
        get_lora_parameters,
        load_dist_checkpoint,
        load_lora_checkpoint,
        lora_spec,
        mark_only_lora_as_trainable,
        merge_lora_weights,
        save_dist_checkpoint,
        save_lora_checkpoint,
    )

    out = {}
    for tp, sp in TE_LAYOUTS:
        if (tp, sp) == (2, False):
            megatron_1699.sum_shared_rope_key_grad()
        initialize_model_parallel(tp=tp)
        plain = tiny_mla.build(tiny_mla.te_spec(), sequence_parallel=sp)
        model = tiny_mla.build(lora_spec(tiny_mla.te_spec(), CONFIG), sequence_parallel=sp)
        posthoc = apply_lora_to_megatron_model(
            tiny_mla.build(tiny_mla.te_spec(), sequence_parallel=sp), CONFIG)
        attention = model.decoder.layers[0].self_attention
        r = {
            "b0_logits": (tiny_gpt.logits(model), tiny_gpt.logits(plain)),
            "routes": (tiny_gpt.full_state(posthoc), tiny_gpt.full_state(model)),
            "splits": {name: (type(m).__name__, m.lora_split.name)
                         for name, m in attention.named_children() if hasattr(m, "lora_split")},
            "attributes": {n: (p.tensor_model_parallel, p.partition_dim,
                               getattr(p, "sequence_parallel", False))
                           for n, p in get_lora_parameters(model).items()
                           if "layers.0.self_attention" in n},
        }
        mark_only_lora_as_trainable(model)
        lora_helpers.set_nonzero_B(model)
        tiny_gpt.loss(model).backward()  # one backward first: the grads themselves
        lora = get_lora_parameters(model)
        r["grads"] = {n: lora_helpers.full_grad(p) for n, p in lora.items()}
        for param in lora.values():
            param.grad = None
        r["losses"] = lora_helpers.train_with_megatron_ddp(model, model.config, steps=STEPS)
        model.eval()
        r["adapters"] = full_adapters(model)
        # Each rank's own copy of the duplicated (whole) adapters: they must not drift apart.
        r["duplicated_local"] = {n: p.detach().clone()
                                 for n, p in get_lora_parameters(model).items()
                                 if "down_proj" in n}
        r["logits"] = tiny_gpt.logits(model)
        if (tp, sp) == (2, True):
            save_lora_checkpoint(model, f"{out_dir}/adapter.safetensors")
            save_dist_checkpoint(model, f"{out_dir}/dist")
        if (tp, sp) == (1, False):  # the TP=2+SP checkpoints, loaded at TP=1
            from_adapter = tiny_mla.build(lora_spec(tiny_mla.te_spec(), CONFIG))
            load_lora_checkpoint(from_adapter, f"{out_dir}/adapter.safetensors")
            from_dist = tiny_mla.build(lora_spec(tiny_mla.te_spec(), CONFIG))
            missing = load_dist_checkpoint(from_dist, f"{out_dir}/dist")
            r["from_tp2_sp"] = {
                "adapter": (full_adapters(from_adapter), tiny_gpt.logits(from_adapter.eval())),
                "dist": (full_adapters(from_dist), tiny_gpt.logits(from_dist.eval()), missing)}
        merge_lora_weights(model)
        r["merged_logits"] = tiny_gpt.logits(model)
        out[(tp, sp)] = r
    return out


# The MLA linears only: real PEFT (0.21, transformers 5) re-targets DeepSeek-V3's gate_proj /
# up_proj / down_proj to its fused experts, so dense-MLP adapters do not reach a PeftModel.
DEEPSEEK_CONFIG = LoRAConfig(r=4, alpha=8, target_modules=tiny_mla.TARGETS)


def deepseek_cases(out_dir: str, peft_dirs: list[str]):
    """At TP=2+SP on the local spec (with the #1699 fix, so training is TP=1's): the converted
    base equals HF; LoRA trained 3 steps and exported (live) for DeepseekV3ForCausalLM; each PEFT
    adapter imported fused and canonical."""
    from megatron_lora import (
        export_peft_adapter,
        import_peft_adapter,
        lora_spec,
        mark_only_lora_as_trainable,
    )

    megatron_1699.sum_shared_rope_key_grad()
    hf = hf_deepseek.build_hf_model()
    ids = hf_llama.tokens()
    out = {"base_logits": hf_llama.gpt_logits(hf_deepseek.gpt_from_hf(hf, sequence_parallel=True),
                                              ids)}
    model = hf_deepseek.gpt_from_hf(hf, lora_spec(tiny_mla.local_spec(), DEEPSEEK_CONFIG),
                                    sequence_parallel=True)
    mark_only_lora_as_trainable(model)
    lora_helpers.set_nonzero_B(model)
    out["losses"] = lora_helpers.train_with_megatron_ddp(
        model, model.config, steps=STEPS, lr=2e-2, loss_fn=peft_cases.cross_entropy_loss)
    model.eval()
    out["logits"] = hf_llama.gpt_logits(model, ids)
    export_peft_adapter(model, f"{out_dir}/peft", base_model_name_or_path="tiny-deepseek",
                        architecture="DeepseekV3ForCausalLM")
    for adapter_dir in peft_dirs:
        for canonical in (False, True):
            plain = hf_deepseek.gpt_from_hf(hf, sequence_parallel=True)
            config = import_peft_adapter(plain, adapter_dir, canonical=canonical)
            out[(adapter_dir, canonical)] = (config, hf_llama.gpt_logits(plain, ids))
    return out


# Each MLA variant of `variant_cases`: (spec, q_lora_rank, qk_layernorm). With q_lora_rank None
# MLA builds `linear_q_proj`; megatron-core 0.19's local spec refuses a q latent norm there
# (no latent to normalize), so that variant runs without q/kv norms.
VARIANTS = [("te", 32, True), ("te", None, True), ("local", 32, True), ("local", None, False)]
VARIANT_LAYOUTS = [(2, True), (1, False)]


def variant_cases():
    """Every MLA variant with LoRA on all of its linears (spec route), at TP=2+SP and TP=1:
    each target's base class and split kind, logits with B = 0 and of the plain model, then with
    non-zero B: logits, adapter grads and merged logits. The TE variants run first: the local
    ones need the #1699 fix, which must not be applied to the TE spec under SP."""
    from megatron_cpu.launch import initialize_model_parallel
    from megatron_lora import get_lora_parameters, lora_spec, merge_lora_weights

    out = {}
    for spec_name in ("te", "local"):
        if spec_name == "local":
            megatron_1699.sum_shared_rope_key_grad()
        for tp, sp in VARIANT_LAYOUTS:
            initialize_model_parallel(tp=tp)
            for variant in [v for v in VARIANTS if v[0] == spec_name]:
                _, q_lora_rank, qk_layernorm = variant
                spec = getattr(tiny_mla, f"{spec_name}_spec")(qk_layernorm=qk_layernorm)
                targets = (("linear_q_down_proj", "linear_q_up_proj") if q_lora_rank
                           else ("linear_q_proj",))
                config = LoRAConfig(r=4, alpha=8, target_modules=targets + (
                    "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"))
                kwargs = dict(q_lora_rank=q_lora_rank, qk_layernorm=qk_layernorm,
                              sequence_parallel=sp)
                plain = tiny_mla.build(spec, **kwargs)
                model = tiny_mla.build(lora_spec(spec, config), **kwargs)
                attention = model.decoder.layers[0].self_attention
                r = {"classes": {name: (m.lora_base_class.__name__, m.lora_split.name)
                                 for name, m in attention.named_children()
                                 if hasattr(m, "lora_split")},
                     "b0_logits": (tiny_gpt.logits(model), tiny_gpt.logits(plain))}
                lora_helpers.set_nonzero_B(model)
                tiny_gpt.loss(model).backward()
                r["grads"] = {n: lora_helpers.full_grad(p)
                              for n, p in get_lora_parameters(model).items()}
                model.eval()
                with torch.no_grad():
                    r["logits"] = tiny_gpt.logits(model)
                    merge_lora_weights(model)
                    r["merged_logits"] = tiny_gpt.logits(model)
                out[(variant, tp, sp)] = r
    return out
