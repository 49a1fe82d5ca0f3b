"""The seam between the adapter sync and a rollout engine: what the sync needs of one kind of
engine, whatever carries the calls (Ray actors, HTTP, an in-process object).

    client = engines.client("sglang")        # sync/engines/<kind>.py
    client.pause(engines); client.unload(engines, name)
    client.load(engines, name, adapter, version); client.set_version(engines, version)
    client.resume(engines)

`AdapterSync` (`adapter_sync.py`) drives a client through that sequence at each sync (resuming
the engines even when a load fails); a new engine is a new file under `engines/` that defines
`Client` and `flag_problems` (its pre-flight check, run by `engines.check_flags` before training),
and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from megatron_lora.sync.peft_tensors import PeftTensors


class EngineClient(Protocol):
    """Drives one kind of rollout engine for the adapter sync. Each method acts on a list of
    engine handles (the engines one weight updater syncs) and returns once all are done; the
    sync calls them on one rank."""

    def pause(self, engines: Sequence) -> None:
        """Stop generating: no request of the adapter may run while it is replaced."""

    def resume(self, engines: Sequence) -> None:
        """Generate again."""

    def unload(self, engines: Sequence, name: str) -> None:
        """Drop the adapter loaded under `name`."""

    def load(self, engines: Sequence, name: str, adapter: PeftTensors, version: str) -> None:
        """Load `adapter` (full tensors under PEFT names, and its `adapter_config`) under `name`,
        which no engine holds; `version` names this sync (an engine that reads the adapter from
        a path puts each version at its own)."""

    def set_version(self, engines: Sequence, version: str) -> None:
        """The weight version the engines report for what they serve now."""
