"""Rank-side cases for test_recompute.py: one optimizer step of a LoRA GPT through Megatron's own
schedule (`get_forward_backward_func`, 2 micro-batches), DDP and grad finalization, under each
activation-recompute setting, returning what the test judges: the loss, every trainable
parameter's finalized grad on this rank, and the adapters after one Adam step (unsharded, by
checkpoint name, gathered from every rank).

No megatron import at module level: the TE-emulated cases run with `te_emulation.enable` as the
launcher's setup.
"""

from __future__ import annotations

import torch

from lora_common import LoRAConfig
from support import lora_helpers, moe_cases, tiny_gpt, tiny_moe

CONFIG = LoRAConfig(r=4, alpha=8)
LAYERS = 4
MICRO_BATCHES = 2
LR = 1e-2

# name -> TransformerConfig fields. "none" is the reference every other setting must equal.
FULL = dict(recompute_granularity="full")
DENSE_SETTINGS = {
    "none": {},
    "full uniform 1": dict(FULL, recompute_method="uniform", recompute_num_layers=1),
    "full uniform 2": dict(FULL, recompute_method="uniform", recompute_num_layers=2),
    "full block 1": dict(FULL, recompute_method="block", recompute_num_layers=1),
    "full block 2": dict(FULL, recompute_method="block", recompute_num_layers=2),
    "selective core_attn": dict(recompute_granularity="selective"),
    "selective mlp": dict(recompute_granularity="selective",
                          recompute_modules=["core_attn", "mlp"]),
}
MOE_SETTINGS = {
    "none": {},
    "full uniform 1": DENSE_SETTINGS["full uniform 1"],
    "full block 1": DENSE_SETTINGS["full block 1"],
    "selective moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "selective shared_experts": dict(recompute_granularity="selective",
                                     recompute_modules=["shared_experts"]),
}
SHARED_FFN = 48

# name -> (initialize_model_parallel sizes, sequence parallel)
LAYOUTS = {
    "TP1": (dict(tp=1), False),
    "TP2+SP": (dict(tp=2), True),
    "PP2": (dict(pp=2), False),
    "PP2 VPP2": (dict(pp=2, virtual_pipeline_model_parallel_size=2), False),
}


def _stages(config_fn, spec_fn, post_hoc: bool):
    """This rank's model chunks (one, or one per virtual stage), each built from seed 0 so that
    every layout holds the same full model."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_lora import apply_lora_to_megatron_model

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        config = config_fn()
        torch.manual_seed(0)
        model = GPTModel(
            config, spec_fn(config, stage), vocab_size=tiny_gpt.VOCAB,
            max_sequence_length=tiny_gpt.SEQ, position_embedding_type="rope",
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            **({"vp_stage": stage} if vpp else {}))
        if post_hoc:
            apply_lora_to_megatron_model(model, CONFIG)
        chunks.append(model)
    return chunks


def dense_chunks(setting: dict, sp: bool, post_hoc: bool = False):
    from megatron.core import parallel_state

    from megatron_lora import lora_spec

    def config_fn():
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        return tiny_gpt.transformer_config(
            num_layers=LAYERS, sequence_parallel=sp, pipeline_dtype=torch.float32,
            virtual_pipeline_model_parallel_size=vpp, **setting)

    def spec_fn(config, vp_stage):
        return tiny_gpt.local_spec() if post_hoc else lora_spec(tiny_gpt.local_spec(), CONFIG)

    return _stages(config_fn, spec_fn, post_hoc)


def moe_chunks(setting: dict, sp: bool, te: bool = False, **overrides):
    """The tiny MoE GPT (SequentialMLP with shared experts on the local spec; TEGroupedMLP on
    the TE spec), spec route, base redrawn by canonical name."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_lora import lora_spec

    def config_fn():
        return tiny_moe.transformer_config(
            num_layers=LAYERS, sequence_parallel=sp, pipeline_dtype=torch.float32,
            moe_grouped_gemm=te, moe_shared_expert_intermediate_size=None if te else SHARED_FFN,
            virtual_pipeline_model_parallel_size=(
                parallel_state.get_virtual_pipeline_model_parallel_world_size()),
            **setting, **overrides)

    def spec_fn(config, vp_stage):
        kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
        return lora_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=te, **kwargs),
                         CONFIG)

    chunks = _stages(config_fn, spec_fn, post_hoc=False)
    for chunk in chunks:
        tiny_moe.redraw_base(chunk)
    return chunks


def mla_chunks(setting: dict, sp: bool):
    """The tiny MLA GPT on the TE spec (emulated), every MLA linear adapted."""
    from megatron_lora import lora_spec
    from support import tiny_mla

    config = tiny_mla.transformer_config(num_layers=LAYERS, sequence_parallel=sp, **setting)
    lora = LoRAConfig(r=CONFIG.r, alpha=CONFIG.alpha,
                      target_modules=[*tiny_mla.TARGETS, "linear_fc1", "linear_fc2"])
    return [tiny_mla.build(lora_spec(tiny_mla.te_spec(), lora), config=config)]


def one_step(chunks) -> dict:
    """Freeze all but the adapters, give every B a value, run one step through Megatron's
    schedule and DDP; the loss, this rank's finalized grads and the adapters after Adam."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_lora import mark_only_lora_as_trainable

    for chunk in chunks:
        mark_only_lora_as_trainable(chunk)
        lora_helpers.set_nonzero_B(chunk, seed=0, scale=0.1)
    config = chunks[0].config
    ddp = [DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                   chunk) for chunk in chunks]
    params = [p for chunk in ddp for p in chunk.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR)
    tokens, positions, labels = tiny_gpt.batch(0)
    micro = [(tokens[i:i + 1], positions[i:i + 1], labels[i:i + 1]) for i in range(MICRO_BATCHES)]

    def forward_step(data_iterator, model):
        tokens, positions, labels = next(data_iterator)
        output = model(tokens, positions, None, labels=labels)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    iterators = [iter(micro) for _ in ddp]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(ddp) > 1 else iterators[0],
        model=ddp if len(ddp) > 1 else ddp[0], num_microbatches=MICRO_BATCHES,
        seq_length=tiny_gpt.SEQ, micro_batch_size=1, forward_only=False)
    finalize_model_grads(ddp)
    grads = {f"{i}.{name}": p.main_grad.detach().clone()
             for i, chunk in enumerate(chunks) for name, p in chunk.named_parameters()
             if p.requires_grad}
    for param in params:
        param.grad = param.main_grad
    optimizer.step()
    adapters = {}
    for chunk in chunks:
        adapters.update(moe_cases.adapter_full_tensors(chunk))
    return {"loss": sum(out["loss"].item() for out in losses) if losses else None,
            "grads": grads, "adapters": adapters}


def _use(layout: str, **sizes) -> bool:
    from megatron_cpu.launch import initialize_model_parallel

    parallel, sp = LAYOUTS[layout]
    initialize_model_parallel(**parallel, **sizes)
    return sp


def dense_cases(layouts: list[str]) -> dict:
    """{(layout, route, setting): one_step(...)} on the dense tiny GPT."""
    out = {}
    for layout in layouts:
        for name, setting in DENSE_SETTINGS.items():
            if "VPP" in layout and setting.get("recompute_num_layers", 1) > 1:
                continue  # one layer per virtual stage
            sp = _use(layout)
            out[(layout, "spec", name)] = one_step(dense_chunks(setting, sp))
        sp = _use(layout)
        out[(layout, "post-hoc", "full uniform 1")] = one_step(
            dense_chunks(DENSE_SETTINGS["full uniform 1"], sp, post_hoc=True))
    return out


def moe_cases_(layouts: list[str]) -> dict:
    out = {}
    for layout in layouts:
        for name, setting in MOE_SETTINGS.items():
            sp = _use(layout, expert_tensor_parallel_size=LAYOUTS[layout][0].get("tp", 1))
            out[(layout, "moe", name)] = one_step(moe_chunks(setting, sp))
    return out


def mtp_case() -> dict:
    """Full recompute with an MTP layer (dense decoder block spec), against none."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    from megatron_lora import lora_spec

    out = {}
    for name in ("none", "full uniform 1"):
        _use("TP1")
        config = tiny_gpt.transformer_config(num_layers=2, mtp_num_layers=1,
                                             **DENSE_SETTINGS[name])
        spec = lora_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=False), CONFIG)
        torch.manual_seed(0)
        model = GPTModel(config, spec, vocab_size=tiny_gpt.VOCAB,
                         max_sequence_length=tiny_gpt.SEQ, position_embedding_type="rope",
                         mtp_block_spec=get_gpt_mtp_block_spec(config, spec,
                                                               use_transformer_engine=False))
        out[name] = one_step([model])
    return out


def te_cases() -> dict:
    """On the TE emulation: TEGroupedMLP experts under `moe_act` + `layernorm`, `moe` and full
    recompute, MLA under `mla_up_proj` and full recompute, at TP=1 and TP=2+SP. The
    output-discarding recompute (`moe_act`, `layernorm`, `mla_up_proj`) needs TE in megatron-core
    0.16 (`CheckpointWithoutOutput` reads TE's FP8 state even without FP8), as on a GPU."""
    grouped = {"none": {}, "selective moe_act layernorm": dict(
                   recompute_granularity="selective", recompute_modules=["moe_act", "layernorm"]),
               "selective moe": MOE_SETTINGS["selective moe"],
               "full uniform 1": DENSE_SETTINGS["full uniform 1"]}
    mla = {"none": {}, "selective mla_up_proj": dict(recompute_granularity="selective",
                                                     recompute_modules=["mla_up_proj"]),
           "full uniform 1": DENSE_SETTINGS["full uniform 1"]}
    out = {}
    for layout in ("TP1", "TP2+SP"):
        for name, setting in grouped.items():
            sp = _use(layout, expert_tensor_parallel_size=LAYOUTS[layout][0].get("tp", 1))
            out[(layout, "TEGroupedMLP", name)] = one_step(moe_chunks(setting, sp, te=True))
        for name, setting in mla.items():
            sp = _use(layout)
            out[(layout, "MLA", name)] = one_step(mla_chunks(setting, sp))
    return out


def guard_cases() -> dict:
    """What the guard does and does not do, on the dense spec-route model at TP=1: the hidden
    states the decoder receives (requires grad?) under recompute and without it, in eval and
    under no_grad; and the loss without the guard (its hook removed)."""
    from megatron_lora import lora_spec, mark_only_lora_as_trainable
    from megatron_lora.adapt.recompute import is_guarded

    _use("TP1")
    out = {}
    for name in ("none", "full uniform 1"):
        model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG),
                                   num_layers=2, **DENSE_SETTINGS[name])
        mark_only_lora_as_trainable(model)
        seen: list[bool] = []
        model.decoder.register_forward_pre_hook(
            lambda m, args, kwargs, seen=seen: seen.append(kwargs["hidden_states"].requires_grad),
            with_kwargs=True)
        tiny_gpt.loss(model)
        with torch.no_grad():
            tiny_gpt.loss(model)
        model.eval()
        tiny_gpt.loss(model)
        model.train()
        out[name] = {"guarded": is_guarded(model.decoder),
                     "decoder_input_requires_grad": list(seen)}
    model.decoder._lora_recompute_guard.remove()
    out["unguarded_loss_requires_grad"] = tiny_gpt.loss(model).requires_grad
    return out

