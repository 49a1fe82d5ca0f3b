"""The stages of one slime run on 2 CPU ranks, each recording what its test asserts.

    results = run_layout(work, hf, unpatched_arguments, layout)   # on every rank

One launch per layout; the stages share its actors:
  flags       slime's `parse_args` with the LoRA flags, patched and unpatched (the control)
  base        a plain actor (no --use-lora) from the HF checkpoint: its log-probs, logits, and
              its `save_model` as the base-only torch_dist checkpoint (what slime's HF ->
              torch_dist conversion yields)
  init        the LoRA actor from `--ref-load <base>` with `--dist-ckpt-strictness log_unexpected`
  strictness  that base loaded again through slime's `load_checkpoint` (patched) and through
              Megatron-LM's own `load_checkpoint` (unpatched), under every strictness
  train       two rollouts of `actor.train`
  sync        every weight-sync transport's HF tensors (colocated with the live weights
              poisoned, NCCL chunks, disk, disk delta), and `--save-hf`; with `--lora-sync
              adapter`, the colocated and the NCCL updaters' base and adapter loads
  save        `save_model`: Megatron checkpoint plus adapter.safetensors
  resume      a new actor with `--load <save>`

A layout with `"stages": "train"` (a reference other layouts are compared with) stops after
train. After each rollout every rank's adapters are saved whole, by their global names
(`adapters-<rollout>.safetensors`), for comparisons across parallel layouts.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import torch

from support import peft_reference
from support.slime import actors, engines, rollout, runtime

STRICTNESS = ["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected",
              "raise_all", "return_unexpected", "return_all", "ignore_all"]


def _lora_flags_parsed(args) -> dict:
    return {name: getattr(args, name, "absent")
            for name in ("use_lora", "lora_r", "lora_alpha", "lora_only_trainable")}


def _unpatched_arguments(path: str):
    spec = importlib.util.spec_from_file_location("slime_unpatched_arguments", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(model_chunks) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for chunk in model_chunks
            for name, param in chunk.named_parameters()}


def _split(params: dict) -> tuple[dict, dict]:
    lora = {n: t for n, t in params.items() if ".lora_" in n}
    return {n: t for n, t in params.items() if ".lora_" not in n}, lora


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _log_probs(actor, args, rollout_id):
    """slime's own `compute_log_prob` (adapters on) on a rollout's batch."""
    from slime.backends.megatron_utils.data import get_data_iterator

    data = actor._get_rollout_data(rollout.rollout_batch(args, rollout_id, _dp_size()))
    result = actor.compute_log_prob(get_data_iterator(data), data["num_microbatches"])
    return _all_samples(data["partition"], result.get("log_probs", []))


def _all_samples(partition, values) -> list:
    """Every sample's whole response values, in sample order, from each data-parallel rank's
    own samples (`partition`: their indices) and, under context parallelism, each rank's chunks
    of them (slime's own gather, as its loss code gathers them); [] where the rank computed none
    (a pipeline's first stage)."""
    import torch.distributed as dist
    from megatron.core import mpu
    from slime.backends.megatron_utils.cp_utils import all_gather_with_cp

    total = rollout.PROMPT + rollout.RESPONSE
    values = [all_gather_with_cp(t.detach(), total, rollout.RESPONSE).clone() for t in values]
    group = mpu.get_data_parallel_group(with_context_parallel=False)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (list(partition), values), group=group)
    if not values:
        return []
    ordered = {}
    for indices, rank_values in everyone:
        ordered.update(zip(indices, rank_values, strict=True))
    return [ordered[i] for i in sorted(ordered)]


def _dp_size():
    from megatron.core import mpu

    return mpu.get_data_parallel_world_size(with_context_parallel=False)


def _dp_rank():
    from megatron.core import mpu

    return mpu.get_data_parallel_rank(with_context_parallel=False)


def _logits(actor, rollout_id):
    """Full-vocabulary logits of each sample of a rollout: the DDP model's own forward (TP
    gathered), without pipeline or context parallelism (None there: each rank holds part of the
    model or of each sequence; slime's `compute_log_prob` is compared instead)."""
    from megatron.core import mpu
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if (mpu.get_pipeline_model_parallel_world_size() > 1
            or mpu.get_context_parallel_world_size() > 1):
        return None
    model = actor.model[0]
    model.eval()
    tokens, _ = rollout.samples(rollout_id, actor.args)
    tokens = torch.tensor(tokens)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        out = model(tokens, positions, None)
    return gather_from_tensor_model_parallel_region(out).float()


def _what_was_built(actor, args) -> dict:
    """What the recipe's flags built: each layer's MLP and attention classes and the settings
    the recipe layouts name."""
    from megatron.core import mpu

    config = actor.model[0].config
    model = actor.model[0]
    while hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    layers = model.decoder.layers
    return {
        "mlp": [type(layer.mlp).__name__ for layer in layers],
        "experts": [type(getattr(layer.mlp, "experts", None)).__name__ for layer in layers],
        "attention": type(layers[0].self_attention).__name__,
        "dispatcher": config.moe_token_dispatcher_type if config.num_moe_experts else None,
        "router": (config.moe_router_score_function, config.moe_router_enable_expert_bias)
        if config.num_moe_experts else None,
        "shared_experts": config.moe_shared_expert_intermediate_size,
        "ep": mpu.get_expert_model_parallel_world_size(),
        "etp": mpu.get_expert_tensor_parallel_world_size(),
        "cp": mpu.get_context_parallel_world_size(),
        "sequence_parallel": config.sequence_parallel,
        "grad_reduce_in_fp32": actor.model[0].ddp_config.grad_reduce_in_fp32,
        "dynamic_batch_size": args.use_dynamic_batch_size,
    }


def _load_base(actor, args, ckpt, strict, through_slime):
    """Load the base-only checkpoint into the model as slime's `load_other_checkpoint` does
    (finetune, no optimizer/rng), through slime's `load_checkpoint` (the patched one) or
    Megatron-LM's own. Returns "loaded" or the error."""
    from megatron.training.checkpointing import load_checkpoint as megatron_load
    from slime.backends.megatron_utils.checkpoint import load_checkpoint as slime_load

    saved = {k: getattr(args, k) for k in ("load", "no_load_optim", "no_load_rng", "finetune",
                                           "dist_ckpt_strictness")}
    args.load, args.no_load_optim, args.no_load_rng, args.finetune = ckpt, True, True, True
    args.dist_ckpt_strictness = strict
    try:
        if through_slime:
            slime_load(actor.model, None, None, checkpointing_context={},
                       skip_load_to_model_and_opt=False)
        else:
            megatron_load(actor.model, None, None, checkpointing_context={},
                          skip_load_to_model_and_opt=False)
        return "loaded"
    except BaseException as error:  # noqa: BLE001 - torch DCP raises BaseException subclasses
        return f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        for key, value in saved.items():
            setattr(args, key, value)


def _capture_colocated(actor) -> tuple[list[dict], list[str]]:
    """The colocated sync slime's `init` built (UpdateWeightFromTensor), into one engine that
    spans both ranks, with every live weight poisoned: it must read the CPU backup only."""
    engine = engines.ColocatedEngine()
    updater = actor.weight_updater
    updater.connect_rollout_engines([engine], engines.Lock(), engine_gpu_counts=[2],
                                    engine_gpu_offsets=[0])
    live = [p for chunk in actor.model for p in chunk.parameters()]
    kept = [p.detach().clone() for p in live]
    with torch.no_grad():
        for param in live:
            param.fill_(float("nan"))
    try:
        updater.update_weights()
    finally:
        with torch.no_grad():
            for param, value in zip(live, kept, strict=True):
                param.copy_(value)
    return engine.received, engine.calls


def _capture_nccl_chunks(actor) -> dict[str, torch.Tensor]:
    """The HF chunks the NCCL sync (UpdateWeightFromDistributed) broadcasts to the engines:
    its patched loops (merge per shard, TP gather, HF conversion; experts also gathered over EP),
    before the broadcast."""
    from megatron.core import mpu
    from slime.backends.megatron_utils.update_weight.update_weight_from_distributed import (
        UpdateWeightFromDistributed,
    )

    updater = UpdateWeightFromDistributed(
        actor.args, actor.model, weights_getter=actor.weight_updater.weights_getter,
        model_name=actor.weight_updater.model_name, quantization_config=None)
    # what connect_rollout_engines decides: the DP=TP=0 rank of each stage sends
    updater._is_pp_src_rank = (mpu.get_data_parallel_rank(with_context_parallel=True) == 0
                               and mpu.get_tensor_model_parallel_rank() == 0)
    return _chunks(updater)


def _chunks(updater) -> dict[str, torch.Tensor]:
    """What `_send_weights` broadcasts: its non-expert pass, then its expert pass."""
    import itertools

    chunks = itertools.chain(updater._iter_non_expert_chunks(), updater._iter_expert_chunks())
    return {name: t.clone() for chunk in chunks for name, t in chunk}


def _adapter_mode(actor):
    """The actor's args switched to `--lora-sync adapter` (and checked as slime's parse_args
    checks them); the patched weights_getter reads `actor.args` at each call."""
    from megatron_lora import check_lora_sync_args

    args = actor.args
    args.lora_sync = "adapter"
    # --colocate turns --offload-rollout on; SGLang keeps its base through an offload with a
    # CPU copy of its weights (else the base is resent every sync: test_rollout_sync.py)
    args.sglang_enable_weights_cpu_backup = True
    check_lora_sync_args(args)  # --debug-train-only: no SGLang flags to ask for
    return args


def _capture_adapter_colocated(actor, work) -> dict:
    """`--lora-sync adapter` on the colocated path: slime's UpdateWeightFromTensor, two syncs
    into an engine spanning both ranks, every live weight poisoned (the CPU backup is read);
    between them every B of the backup doubled (a new adapter version). Also the PEFT export
    of the same model, to compare the payloads with."""
    import torch.distributed as dist
    from slime.backends.megatron_utils.update_weight.update_weight_from_tensor import (
        UpdateWeightFromTensor,
    )

    from megatron_lora import export_peft_adapter
    from megatron_lora.sync.serving_form import peft_form

    args = _adapter_mode(actor)
    architecture, expand_shared = peft_form(args)
    export_peft_adapter(actor.model, f"{work}/peft-export", architecture=architecture,
                        expand_shared=expand_shared)
    updater = UpdateWeightFromTensor(args, actor.model,
                                     weights_getter=actor.weight_updater.weights_getter,
                                     model_name=actor.weight_updater.model_name,
                                     quantization_config=None)
    engine = engines.ColocatedEngine()
    updater.connect_rollout_engines([engine], engines.Lock(), engine_gpu_counts=[2],
                                    engine_gpu_offsets=[0])
    live = [p for chunk in actor.model for p in chunk.parameters()]
    kept = [p.detach().clone() for p in live]
    backup = actor.weights_backuper.get("actor")
    b_names = [n for n in backup if ".lora_B.weight" in n]  # grouped experts: weight<e>
    try:
        with torch.no_grad():
            for param in live:
                param.fill_(float("nan"))
        updater.update_weights()
        with torch.no_grad():
            for name in b_names:
                backup[name].mul_(2)
        updater.update_weights()
    finally:
        with torch.no_grad():
            for name in b_names:
                backup[name].div_(2)
            for param, value in zip(live, kept, strict=True):
                param.copy_(value)
        args.lora_sync, args.sglang_enable_weights_cpu_backup = "merged", None
    dist.barrier()
    export = None
    if dist.get_rank() == 0:
        export = peft_reference.read_peft_folder(f"{work}/peft-export")
    return {"base": engine.received, "calls": engine.calls, "loads": engine.loads,
            "decoder": engine.decoder, "export": export,
            "live_restored": all(torch.equal(p, v) for p, v in zip(live, kept, strict=True))}


def _capture_adapter_distributed(actor) -> dict:
    """`--lora-sync adapter` on the NCCL updater (UpdateWeightFromDistributed): its base chunks,
    unmerged, and a sync after the first (the base already sent), whose adapter reaches a
    non-colocated engine over HTTP (no NCCL group is needed for it)."""
    from megatron.core import mpu
    from slime.backends.megatron_utils.update_weight.update_weight_from_distributed import (
        UpdateWeightFromDistributed,
    )

    args = _adapter_mode(actor)
    try:
        updater = UpdateWeightFromDistributed(
            args, actor.model, weights_getter=actor.weight_updater.weights_getter,
            model_name=actor.weight_updater.model_name, quantization_config=None)
        updater._is_pp_src_rank = (mpu.get_data_parallel_rank(with_context_parallel=True) == 0
                                   and mpu.get_tensor_model_parallel_rank() == 0)
        updater._group_name = "slime-pp_test"
        base = _chunks(updater)
        engine = engines.DistributedEngine()
        updater.rollout_engines = [engine]
        updater.lora_sync.connect([engine])
        updater.lora_sync.base_sent = True  # what the first sync (its NCCL broadcast) recorded
        updater.update_weights()
    finally:
        args.lora_sync, args.sglang_enable_weights_cpu_backup = "merged", None
    return {"base": base, "calls": engine.calls, "loads": engine.loads}


def _read_hf_folder(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _capture_disk(actor, work) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from slime.backends.megatron_utils.update_weight.update_weight_from_disk import (
        UpdateWeightFromDisk,
    )

    args = copy.copy(actor.args)
    args.update_weight_transport, args.update_weight_disk_dir = "disk", f"{work}/disk-sync"
    updater = UpdateWeightFromDisk(args, actor.model,
                                   weights_getter=actor.weight_updater.weights_getter,
                                   model_name=actor.weight_updater.model_name,
                                   quantization_config=None)
    updater.connect_rollout_engines([], engines.Lock())
    updater.update_weights()
    return _read_hf_folder(f"{work}/disk-sync/weight_v000001") if dist.get_rank() == 0 else {}


def _capture_delta(actor, work, hf) -> tuple[dict[str, torch.Tensor], list[int]]:
    import torch.distributed as dist
    from slime.backends.megatron_utils.update_weight.update_weight_from_disk_delta import (
        UpdateWeightFromDiskDelta,
    )

    args = copy.copy(actor.args)
    args.colocate, args.update_weight_mode, args.update_weight_transport = False, "delta", "disk"
    args.update_weight_disk_dir = f"{work}/delta-sync"
    args.update_weight_local_checkpoint_dir = f"{work}/delta-local"
    engine = engines.DeltaEngine(hf, args.update_weight_disk_dir)
    updater = UpdateWeightFromDiskDelta(args, actor.model,
                                        weights_getter=actor.weight_updater.weights_getter,
                                        model_name=actor.weight_updater.model_name,
                                        quantization_config=None)
    updater.connect_rollout_engines([engine] if dist.get_rank() == 0 else [], engines.Lock())
    updater.update_weights()  # the baseline: the engine materializes the HF checkpoint
    updater.update_weights()  # version 1: the delta to the trained, merged weights
    return (engine.state if dist.get_rank() == 0 else {}), engine.applied


def _fp32(args) -> None:
    """slime always trains in bf16 (`_set_default_megatron_args`); fp32 here, for equalities
    that leave no room for rounding: what Megatron's `validate_args` sets for a fp32 run."""
    args.bf16 = False
    args.params_dtype = torch.float32


def run_layout(work: str, hf: str, unpatched_arguments: str, layout: dict) -> dict:
    import torch.distributed as dist

    from megatron_lora import save_lora_checkpoint

    ports = runtime.hand_over_process_group(3)
    runtime.cpu_runtime()
    import megatron.core

    out = {"megatron_core_file": megatron.core.__file__}
    every_stage = layout.get("stages") != "train"
    tp, pp, bf16 = layout["tp"], layout["pp"], layout["bf16"]
    common = dict(hf=hf, tp=tp, pp=pp, bf16=bf16, model=layout.get("model", "tiny_qwen2"),
                  recipe=layout.get("recipe", ()))
    lora_run = ["--ref-load", f"{work}/base", "--save", f"{work}/run", "--save-interval", "1",
                "--use-kl-loss", "--kl-loss-coef", "0.01", "--colocate", "--no-offload-train",
                "--rollout-num-gpus-per-engine", "2", "--save-hf", f"{work}/hf-{{rollout_id}}",
                "--dist-ckpt-strictness", "log_unexpected"]
    if layout.get("canonical"):
        lora_run.append("--lora-canonical")  # one adapter per projection (q, k, v, gate, up)
    if layout.get("recompute"):  # the flags of slime's launch recipes (scripts/run-*.sh)
        lora_run += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"]

    # ----- base: a plain actor from the HF checkpoint, saved as the torch_dist base --------
    args = actors.parse(actors.command_line(lora=False, **common, extra=[
        "--load", hf, "--save", f"{work}/base", "--save-interval", "1", "--no-save-optim"]))
    if not bf16:
        _fp32(args)
    actor, _ = actors.build(args, ports[0])
    out["base_log_probs"] = [_log_probs(actor, args, r) for r in range(2)]
    out["base_logits"] = _logits(actor, 0)
    base_params = _params(actor.model)
    actor.save_model(0)
    # the control for the strictness stage: the same loads into this plain model
    out["strictness_plain"] = {strict: _load_base(actor, args, f"{work}/base", strict, True)
                               for strict in STRICTNESS if every_stage}
    actors.retire(actor)

    # ----- flags --------------------------------------------------------------------------
    argv = actors.command_line(lora=True, **common, extra=lora_run)
    out["flags_patched"] = _lora_flags_parsed(actors.parse(argv))
    out["flags_unpatched"] = _lora_flags_parsed(
        actors.parse(argv, _unpatched_arguments(unpatched_arguments)))

    # ----- init: the LoRA actor from the base-only checkpoint -----------------------------
    args = actors.parse(argv)
    if not bf16:
        _fp32(args)
    actor, start = actors.build(args, ports[1], with_ref=True)
    config = actor.model[0].config
    out["recompute"] = (config.recompute_granularity, config.recompute_method,
                        config.recompute_num_layers)
    out["built"] = _what_was_built(actor, args)
    params = _params(actor.model)
    base, lora = _split(params)
    out["init"] = {
        "start_rollout_id": start,
        "trainable": sorted(n for c in actor.model for n, p in c.named_parameters()
                            if p.requires_grad),
        "lora_names": sorted(lora), "base_equal": _equal(base, base_params),
        "B_zero": all(not t.any() for n, t in lora.items() if ".lora_B." in n),
        "A_nonzero": all(t.any() for n, t in lora.items() if ".lora_A." in n),
        "lora_ref": actor.lora_ref, "backup_tags": sorted(actor.weights_backuper.backup_tags),
    }
    out["init_log_probs"] = _log_probs(actor, args, 0)

    # ----- strictness: the base-only start, every --dist-ckpt-strictness ------------------
    out["strictness"] = {}
    for strict in STRICTNESS if every_stage else ():
        for through_slime in (True, False):
            outcome = _load_base(actor, args, f"{work}/base", strict, through_slime)
            out["strictness"][(strict, through_slime)] = (outcome, _equal(_params(actor.model),
                                                                          params))

    # ----- train: two rollouts ------------------------------------------------------------
    out["train"] = []
    for rollout_id in range(2):
        refs = rollout.rollout_batch(args, rollout_id, _dp_size(),
                                     rollout_log_probs=out["base_log_probs"][rollout_id] or None)
        actor.train(rollout_id, refs)
        data = refs[_dp_rank()].inner.value  # the batch slime's train_actor filled in
        # every adapter, whole, by its global name (experts by global index): what layouts
        # with other parallel sizes compare
        save_lora_checkpoint(actor.model, f"{work}/adapters-{rollout_id}.safetensors")
        out["train"].append({"ref_log_probs": _all_samples(data["partition"],
                                                           data.get("ref_log_probs", [])),
                             "params": _split(_params(actor.model))})
    trained = _params(actor.model)
    if not every_stage:  # a reference layout: its trained adapters only
        actors.retire(actor)
        return out

    # ----- sync: every transport ----------------------------------------------------------
    sync = out["sync"] = {}
    sync["colocated"], sync["colocated_calls"] = _capture_colocated(actor)
    sync["live_restored"] = _equal(_params(actor.model), trained)
    sync["nccl"] = _capture_nccl_chunks(actor)
    sync["disk"] = _capture_disk(actor, work)
    sync["delta"], sync["delta_applied"] = _capture_delta(actor, work, hf)
    sync["adapter_colocated"] = _capture_adapter_colocated(actor, work)
    sync["adapter_distributed"] = _capture_adapter_distributed(actor)
    out["trained_log_probs"] = [_log_probs(actor, args, r) for r in range(2)]
    out["trained_logits"] = _logits(actor, 0)

    # ----- save ---------------------------------------------------------------------------
    actor.save_model(1)
    dist.barrier()
    out["saved"] = {"adapter_file": os.path.isfile(f"{work}/run/iter_0000001/adapter.safetensors"),
                    "hf": _read_hf_folder(f"{work}/hf-1") if dist.get_rank() == 0 else {}}
    out["trained_lora"] = _split(trained)[1]
    actors.retire(actor)

    # ----- resume -------------------------------------------------------------------------
    # --no-load-optim: Megatron's torch-optimizer fallback (no apex / TE, as on this CPU)
    # cannot load a distributed-optimizer state into a fresh optimizer (its init_state_fn
    # creates no "step", which DistributedOptimizer.state_dict asserts); the GPU path uses TE's.
    args = actors.parse(actors.command_line(lora=True, **common, extra=[
        "--load", f"{work}/run", "--no-load-optim", *lora_run]))
    if not bf16:
        _fp32(args)
    actor, start = actors.build(args, ports[2], with_ref=True)
    resumed = _split(_params(actor.model))
    out["resume"] = {"start_rollout_id": start,
                     "lora_equal": _equal(resumed[1], out["trained_lora"]),
                     "base_equal": _equal(resumed[0], _split(trained)[0]),
                     "log_probs": _log_probs(actor, args, 0)}
    actors.retire(actor)
    return out
