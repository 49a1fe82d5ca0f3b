"""Weight sync of a LoRA model to SGLang rollout engines, in the mode `--lora-sync` names.

- `merged` (the default): every sync sends the whole model, each base weight with its adapter
  merged in (`W + s B A`, `weight_sync.merged_weights`); the engine serves a plain model.
- `adapter`: the base goes to the engines unmerged, once (again to engines that join later, and
  after every rollout offload unless SGLang keeps a CPU copy of its weights); each sync then
  loads only the adapter, under one name, from tensors (`peft_tensors.gather_peft_adapter`,
  sent as `interop/sglang.py` says), and generation asks for that adapter. About 1% of the
  bytes, and the engine computes `W x + s B (A x)` instead of rounding `W + s B A` to bf16.

What slime calls (patches/slime-624b824a-lora.patch):

    check_lora_sync_args(args)                    # parse time: bad flags refused before any work
    rollout_weights(backup, model, args, device)  # what the base sync reads (colocated)
    iter_rollout_tensors(pairs, model, args)      # the same for a stream (NCCL)
    sync = AdapterSync(args, model)               # one per weight updater
    sync.connect(engines, paused=...)             # from connect_rollout_engines
    if sync.sends_base(): ...                     # the existing base sync
    sync.push_adapter(tensors, version)           # every rank; rank 0 calls the engines
    payload.update(lora_request_fields(args))     # each /generate request
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.state import is_lora_parameter
from megatron_lora.interop import hf_mapping, sglang

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
    unmapped = [t for t in targets if t not in hf_mapping.TARGETS]
    if unmapped:
        problems.append(f"--lora-target-modules {unmapped} have no HF PEFT names "
                        f"(the adapter sync knows {', '.join(hf_mapping.TARGETS)})")
    hf_targets = hf_mapping.hf_target_modules([t for t in targets if t in hf_mapping.TARGETS])
    experts = getattr(args, "num_experts", None)
    if experts:
        # The package's producer carries expert adapters (gather_peft_adapter), but slime's
        # MoE sync path and SGLang's MoE LoRA serving are not verified with it yet.
        problems.append(f"--num-experts {experts}: the adapter sync of MoE models through slime "
                        f"is not wired yet (use --lora-sync merged)")
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
    from megatron_lora.weight_sync import merged_weights

    if not adapter_mode(args):
        return merged_weights(tensors, model, device=device)
    _require_unmerged(model)
    return tensors


def iter_rollout_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], model, args,
                         device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream form of `rollout_weights`: merged pairs, or in adapter mode the base pairs as
    they are (adapter matrices dropped: the base converters do not know their names)."""
    from megatron_lora.weight_sync import iter_merged_tensors

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
    from megatron_lora.model import lora_modules

    require_state(lora_modules(model), "the adapter sync's base weights", merged=False,
                  model=model)


# ----- the adapter itself -------------------------------------------------------------------

class AdapterSync:
    """One weight updater's adapter sync to its engines (slime's engine actors: Ray handles
    with `load_lora_adapter_from_tensors`, `unload_lora_adapter`, `update_weight_version`,
    `pause_generation`, `continue_generation`). Inert (sends the base every time, no adapter)
    unless `--use-lora --lora-sync adapter`."""

    def __init__(self, args, model, name: str = sglang.ADAPTER_NAME):
        self.enabled = adapter_mode(args)
        self.model = model
        self.name = name
        # Without a CPU copy, SGLang's offload drops the base weights: resend them each sync.
        self.base_survives = not getattr(args, "offload_rollout", False) or bool(
            getattr(args, "sglang_enable_weights_cpu_backup", False))
        self.engines: list = []
        self.unpaused: list = []     # engines the caller does not pause around a sync
        self.loaded: list = []       # engines holding `name` (unload before the next load)
        self.base_sent = False

    def connect(self, engines: Sequence, paused: Sequence | None = None) -> None:
        """The engines to sync, of which `paused` are paused by the caller during a sync (all
        of them by default). Engines new to this sync get the base again."""
        engines = list(engines)
        paused = engines if paused is None else list(paused)
        if any(e not in self.engines for e in engines):
            self.base_sent = False
        self.engines = engines
        self.unpaused = [e for e in engines if e not in paused]
        self.loaded = [e for e in self.loaded if e in engines]

    def sends_base(self) -> bool:
        """Whether this sync sends the base weights (always, outside adapter mode)."""
        return not self.enabled or not self.base_sent or not self.base_survives

    def push_adapter(self, tensors: Mapping[str, torch.Tensor], version) -> None:
        """Load the adapter read from `tensors` (this rank's shards by name) into every engine
        under `self.name`, replacing the previous one, and set the engines' weight version.
        Call on every rank (the adapter is gathered to rank 0, which calls the engines)."""
        if not self.enabled:
            return
        from megatron_lora.peft_tensors import gather_peft_adapter

        adapter = gather_peft_adapter(tensors, self.model)
        self.base_sent = True
        if adapter is None:  # not rank 0
            return
        import ray

        config = sglang.serving_config(adapter.config)
        payload = ray.put(sglang.encode_tensors(adapter.tensors()))  # one copy for all engines
        if self.unpaused:  # unloading waits for the adapter's requests: none may be running
            ray.get([e.pause_generation.remote() for e in self.unpaused])
        ray.get([e.unload_lora_adapter.remote(self.name) for e in self.loaded])
        ray.get([e.load_lora_adapter_from_tensors.remote(self.name, config, payload)
                 for e in self.engines])
        self.loaded = list(self.engines)
        ray.get([e.update_weight_version.remote(str(version)) for e in self.engines])
        if self.unpaused:
            ray.get([e.continue_generation.remote() for e in self.unpaused])
