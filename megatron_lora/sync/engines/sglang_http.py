"""SGLang servers reached over HTTP by their URL (`http://127.0.0.1:30000`): a server you started
yourself, as `make test-engines` and the RL demo do, rather than slime's engine actors
(`sglang.py`). The same endpoints, request bodies and payload (`interop/sglang.py`); the payload
is encoded once for all servers.

    sync = AdapterSync(args, model, client=engines.client("sglang_http"))
    sync.connect(["http://127.0.0.1:30000"], paused=[])   # the sync pauses them itself
"""

from __future__ import annotations

from collections.abc import Sequence

from engine_servers.http import post
from megatron_lora.interop import sglang
from megatron_lora.sync.engines import hf_targets
from megatron_lora.sync.peft_tensors import PeftTensors


class Client:
    """`EngineClient` for SGLang servers, each named by its base URL."""

    def __init__(self, timeout: float = 300.0):
        self.timeout = timeout

    def pause(self, engines: Sequence[str]) -> None:
        for url in engines:  # SGLang's default mode aborts what is running, as slime pauses
            post(url, "pause_generation", {}, self.timeout)

    def resume(self, engines: Sequence[str]) -> None:
        for url in engines:
            post(url, "continue_generation", {}, self.timeout)

    def unload(self, engines: Sequence[str], name: str) -> None:
        for url in engines:
            post(url, sglang.UNLOAD_ENDPOINT, sglang.lora_unload_request(name), self.timeout)

    def load(self, engines: Sequence[str], name: str, adapter: PeftTensors, version: str) -> None:
        body = sglang.lora_load_request(sglang.serving_config(adapter.config),
                                        sglang.encode_tensors(adapter.tensors()), name=name)
        for url in engines:
            _require_success(post(url, sglang.LOAD_ENDPOINT, body, self.timeout), url, name)

    def set_version(self, engines: Sequence[str], version: str) -> None:
        for url in engines:
            post(url, sglang.WEIGHT_VERSION_ENDPOINT, sglang.weight_version_request(version),
                 self.timeout)


def _require_success(answer: dict, url: str, name: str) -> None:
    # SGLang answers a failed load with HTTP 200 and success: false
    if answer.get("success") is False:
        raise RuntimeError(f"SGLang at {url} refused adapter {name!r}: "
                           f"{answer.get('error_message') or answer}")


def flag_problems(config, **server_flags) -> list[str]:
    """What keeps an SGLang server started with `server_flags` (ServerArgs field names:
    `enable_lora`, `max_lora_rank`, `lora_target_modules`, `dp_size`, `max_loaded_loras`) from
    serving adapters of `config` (a `LoRAConfig`) loaded from tensors."""
    return sglang.server_flag_problems(r=config.r, target_modules=hf_targets(config),
                                       **{f: server_flags.get(f) for f in sglang.SERVER_FLAGS})
