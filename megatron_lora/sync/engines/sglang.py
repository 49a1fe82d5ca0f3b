"""SGLang engines as slime drives them: Ray actors whose methods POST to SGLang's HTTP server
(`load_lora_adapter_from_tensors`, `unload_lora_adapter`, `update_weight_version`,
`pause_generation`, `continue_generation`). The request bodies and the payload are
`interop/sglang.py`'s; the payload is put in Ray's object store once for all engines."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_lora.interop import sglang
from megatron_lora.sync.peft_tensors import PeftTensors


class Client:
    """`EngineClient` for slime's SGLang engine actors (Ray handles)."""

    def pause(self, engines: Sequence) -> None:
        _all(e.pause_generation.remote() for e in engines)

    def resume(self, engines: Sequence) -> None:
        _all(e.continue_generation.remote() for e in engines)

    def unload(self, engines: Sequence, name: str) -> None:
        _all(e.unload_lora_adapter.remote(name) for e in engines)

    def load(self, engines: Sequence, name: str, adapter: PeftTensors, version: str) -> None:
        import ray

        config = sglang.serving_config(adapter.config)
        payload = ray.put(sglang.encode_tensors(adapter.tensors()))  # one copy for all engines
        _all(e.load_lora_adapter_from_tensors.remote(name, config, payload) for e in engines)

    def set_version(self, engines: Sequence, version: str) -> None:
        _all(e.update_weight_version.remote(version) for e in engines)


def _all(refs) -> None:
    import ray

    refs = list(refs)
    if refs:
        ray.get(refs)
