"""vLLM servers reached over HTTP by their URL. vLLM loads adapters from a path, not from
tensors: each version is written as a PEFT folder of its own under `root` (a path no loaded
version has had: vLLM's prefix cache keys cached blocks on an adapter's name and path, so a
rewritten folder would be served from stale blocks), loaded under the sync's name once the
previous version is unloaded, and that version's folder is deleted. The server must read `root`
(this machine, or a shared filesystem). Requests, flags and caveats: `interop/vllm.py`.

    sync = AdapterSync(args, model, client=engines.client("vllm", root="/tmp/adapters"))
    sync.connect(["http://127.0.0.1:8000"], paused=[])
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from engine_servers.http import post
from lora_common.peft_files import write_peft_adapter
from megatron_lora.interop import vllm
from megatron_lora.sync.engines import hf_targets
from megatron_lora.sync.peft_tensors import PeftTensors


class Client:
    """`EngineClient` for vLLM servers, each named by its base URL; adapter folders go under
    `root`."""

    def __init__(self, root: str | os.PathLike, timeout: float = 300.0):
        self.root = Path(root)
        self.timeout = timeout
        self.folders: dict[str, Path] = {}  # adapter name -> the folder of its loaded version
        self._serial = itertools.count()

    def pause(self, engines: Sequence[str]) -> None:
        for url in engines:  # let running requests finish (nothing is generated meanwhile)
            post(url, "pause?mode=wait", {}, self.timeout)

    def resume(self, engines: Sequence[str]) -> None:
        for url in engines:
            post(url, "resume", {}, self.timeout)

    def unload(self, engines: Sequence[str], name: str) -> None:
        for url in engines:
            post(url, vllm.UNLOAD_ENDPOINT, vllm.lora_unload_request(name), self.timeout)
        folder = self.folders.pop(name, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def load(self, engines: Sequence[str], name: str, adapter: PeftTensors, version: str) -> None:
        folder = self.fresh_folder(name, version)
        write_peft_adapter(folder, adapter.config, adapter.modules, adapter.shared)
        for url in engines:
            post(url, vllm.LOAD_ENDPOINT, vllm.lora_load_request(name, folder), self.timeout)
        self.folders[name] = folder

    def set_version(self, engines: Sequence[str], version: str) -> None:
        for url in engines:
            post(url, "update_weight_version", {"new_version": str(version)}, self.timeout)

    def fresh_folder(self, name: str, version: str) -> Path:
        """A folder for this version that no version loaded before has had."""
        while True:
            folder = self.root / f"{name}-v{version}-{os.getpid()}-{next(self._serial)}"
            if not folder.exists():
                return folder


def flag_problems(config, **server_flags) -> list[str]:
    """What keeps a vLLM server started with `server_flags` (`enable_lora`, `max_lora_rank`,
    `max_loras`: its argument names) from serving adapters of `config` (a `LoRAConfig`)."""
    return vllm.server_flag_problems(r=config.r, target_modules=hf_targets(config),
                                     **{f: server_flags.get(f) for f in vllm.SERVER_FLAGS})
