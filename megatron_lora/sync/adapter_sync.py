"""The adapter sync of one weight updater: the base once, then only the adapter at each sync,
through an engine client (`engine.py`; SGLang's by default, `engines/sglang.py`).

    sync = AdapterSync(args, model)          # inert unless --use-lora --lora-sync adapter
    sync.connect(engines, paused=...)        # the engines; which the caller pauses itself
    if sync.sends_base(): ...                # the caller's own base sync, unmerged
    sync.push_adapter(tensors, version)      # every rank: gathered to rank 0, which loads it
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_lora.interop import sglang
from megatron_lora.sync import engines as engine_clients
from megatron_lora.sync.serving_form import peft_form
from megatron_lora.sync.slime import adapter_mode


class AdapterSync:
    """One weight updater's adapter sync to its engines. Inert (sends the base every time, no
    adapter) unless `--use-lora --lora-sync adapter`. `client`: how to reach the engines
    (an `EngineClient`; slime's SGLang engine actors by default)."""

    def __init__(self, args, model, name: str = sglang.ADAPTER_NAME, client=None):
        self.enabled = adapter_mode(args)
        self.model = model
        self.name = name
        self.client = client if client is not None else engine_clients.client("sglang")
        # the HF names the engine knows the model's modules by, and the experts' shared factors
        # in SGLang's shared form or copied into every expert (serving_form.py)
        self.architecture, self.expand_shared = peft_form(args) if self.enabled else (None, True)
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
        from megatron_lora.sync.peft_tensors import gather_peft_adapter

        adapter = gather_peft_adapter(tensors, self.model, architecture=self.architecture,
                                      expand_shared=self.expand_shared)
        self.base_sent = True
        if adapter is None:  # not rank 0
            return
        version = str(version)
        if self.unpaused:  # unloading waits for the adapter's requests: none may be running
            self.client.pause(self.unpaused)
        try:
            if self.loaded:  # an engine refuses a name it holds: unload, then load
                self.client.unload(self.loaded, self.name)
                self.loaded = []
            self.client.load(self.engines, self.name, adapter, version)
            self.loaded = list(self.engines)
            self.client.set_version(self.engines, version)
        finally:  # a failed load must not leave the engines paused
            if self.unpaused:
                self.client.resume(self.unpaused)

    def unload(self) -> None:
        """Drop the adapter from the engines that hold it (rank 0; e.g. when training ends)."""
        if self.loaded:
            self.client.unload(self.loaded, self.name)
            self.loaded = []
