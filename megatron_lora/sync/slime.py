"""slime's side of the weight sync of a LoRA model, in the mode `--lora-sync` names: the flag
checks, what the base sync reads, what a generation request adds.

- `merged` (the default): every sync sends the whole model, each base weight with its adapter
  merged in (`W + s B A`, `merged.merged_weights`); the engine serves a plain model.
- `adapter`: the base goes to the engines unmerged, once (again to engines that join later, and
  after every rollout offload unless SGLang keeps a CPU copy of its weights); each sync then
  loads only the adapter, under one name (`adapter_sync.AdapterSync`), and generation asks for
  that adapter. About 1% of the bytes, and the engine computes `W x + s B (A x)` instead of
  rounding `W + s B A` to bf16.

What slime calls (patches/slime-624b824a-lora.patch):

    check_lora_sync_args(args)                    # parse time: bad flags refused before any work
    rollout_weights(backup, model, args, device)  # what the base sync reads (colocated)
    iter_rollout_tensors(pairs, model, args)      # the same for a stream (NCCL)
    sync = AdapterSync(args, model)               # one per weight updater (adapter_sync.py)
    sync.connect(engines, paused=...)             # from connect_rollout_engines
    if sync.sends_base(): ...                     # the existing base sync
    sync.push_adapter(tensors, version)           # every rank; rank 0 calls the engines
    payload.update(lora_request_fields(args))     # each /generate request
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.state import is_lora_parameter
from lora_common.targets import PROJECTION_TARGETS
from megatron_lora.interop import hf_mapping, sglang
from megatron_lora.sync.serving_form import serving_problems

logger = logging.getLogger(__name__)

MODES = ("merged", "adapter")


def adapter_mode(args) -> bool:
    """Whether this run syncs the adapter on its own (`--use-lora --lora-sync adapter`)."""
    return (bool(getattr(args, "use_lora", False))
            and getattr(args, "lora_sync", "merged") == "adapter")


# ----- flags ----------------------------------------------------------------------------------

def sglang_launch_flags(r: int, hf_targets: Iterable[str]) -> str:
    """The slime flags that start SGLang ready for the adapter sync."""
    return (f"--sglang-enable-lora --sglang-max-lora-rank {r} "
            f"--sglang-lora-target-modules {' '.join(hf_targets)}")


def check_lora_sync_args(args) -> None:
    """Refuse, naming every culprit, a `--lora-sync adapter` run that cannot work, before any
    work starts. A no-op in merged mode."""
    mode = getattr(args, "lora_sync", "merged")
    if mode not in MODES:
        raise ValueError(f"--lora-sync {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "adapter":
        return
    problems = []
    if not getattr(args, "use_lora", False):
        problems.append("--use-lora is off (there is no adapter to sync)")
    config = LoRAConfig.from_args(args)
    targets = config.target_modules or MEGATRON_TARGET_MODULES
    # a dotted entry (experts.linear_fc1) has the names of its last module; canonical
    # projections (linear_q, ...) are HF modules of their own (q_proj, ...)
    known = (*hf_mapping.TARGETS, *hf_mapping.MLA_TARGETS, *PROJECTION_TARGETS)
    modules = [t.rsplit(".", 1)[-1] for t in targets]
    unmapped = [t for t, module in zip(targets, modules, strict=True) if module not in known]
    if unmapped:
        problems.append(f"--lora-target-modules {unmapped} have no HF PEFT names "
                        f"(the adapter sync knows {', '.join(known)})")
    hf_targets = hf_mapping.hf_target_modules([m for m in modules if m in known])
    # MoE experts and multi-latent attention: their names, and what SGLang cannot serve
    problems += serving_problems(args, targets, config.expert_layout)
    transport = getattr(args, "update_weight_transport", None)
    if transport == "disk" or getattr(args, "update_weight_mode", "full") == "delta":
        problems.append(f"--update-weight-transport {transport} / --update-weight-mode "
                        f"{getattr(args, 'update_weight_mode', 'full')} write the merged model to "
                        f"disk; the adapter sync runs over the tensor (colocated) and distributed "
                        f"transports")
    if not getattr(args, "debug_train_only", False):  # SGLang is started: it must serve LoRA
        problems += sglang.server_flag_problems(
            r=config.r, target_modules=hf_targets, prefix="--sglang-",
            enable_lora=getattr(args, "sglang_enable_lora", None),
            max_lora_rank=getattr(args, "sglang_max_lora_rank", None),
            lora_target_modules=getattr(args, "sglang_lora_target_modules", None),
            dp_size=getattr(args, "sglang_dp_size", None),
            max_loaded_loras=getattr(args, "sglang_max_loaded_loras", None))
    if problems:
        raise ValueError("--lora-sync adapter: " + "; ".join(problems) + ". Start SGLang with "
                         + sglang_launch_flags(config.r, hf_targets))
    if getattr(args, "offload_rollout", False) and not getattr(
            args, "sglang_enable_weights_cpu_backup", False):
        logger.warning("--lora-sync adapter with --offload-rollout: SGLang drops its weights at "
                       "each offload, so the base is sent again every sync; add "
                       "--sglang-enable-weights-cpu-backup to send it once")


def lora_request_fields(args) -> dict:
    """What a `/generate` request adds to use the synced adapter: `{"lora_path": name}` in
    adapter mode, `{}` otherwise."""
    return {"lora_path": sglang.ADAPTER_NAME} if adapter_mode(args) else {}


# ----- what the base sync reads -----------------------------------------------------------

def rollout_weights(tensors: Mapping[str, torch.Tensor], model, args, device=None) -> Mapping:
    """The mapping a base sync reads: merged mode, the merged view (`merged_weights`); adapter
    mode, `tensors` themselves, unmerged (slime's sync lists only base names; the adapter
    matrices stay for `AdapterSync.push_adapter`)."""
    from megatron_lora.sync.merged import merged_weights

    if not adapter_mode(args):
        return merged_weights(tensors, model, device=device)
    _require_unmerged(model)
    return tensors


def iter_rollout_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], model, args,
                         device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream form of `rollout_weights`: merged pairs, or in adapter mode the base pairs as
    they are (adapter matrices dropped: the base converters do not know their names)."""
    from megatron_lora.sync.merged import iter_merged_tensors

    if not adapter_mode(args):
        yield from iter_merged_tensors(named_tensors, model, device=device)
        return
    _require_unmerged(model)
    for name, tensor in named_tensors:
        if not is_lora_parameter(name):
            yield name, tensor


def _require_unmerged(model) -> None:
    # A merged W already holds the delta: with the adapter loaded beside it the engine would
    # apply it twice.
    from lora_common.state import require_state
    from megatron_lora.modules import lora_modules

    require_state(lora_modules(model), "the adapter sync's base weights", merged=False,
                  model=model)
