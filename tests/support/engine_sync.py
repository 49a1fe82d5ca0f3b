"""A training rank's weight sync to a live rollout engine server, in each mode the engine tests
and the sync benchmark run. Every rank calls `push` (the gathers are collective); rank 0 talks
to the server.

    sync = engine_sync.make("sglang", "adapter", url, model, work)
    sync.push(version)            # after an optimizer step: the engine then serves the model
    served(sync, prompt)          # the engine's prompt log-probs of what the sync serves

Modes:
- `adapter`: the library's `AdapterSync` (the producer `gather_peft_adapter`, the engine client
  of `megatron_lora/sync/engines/`: `sglang_http`, SGLang's `/load_lora_adapter_from_tensors`;
  `vllm`, a PEFT folder per version and `/v1/load_lora_adapter`); it pauses and resumes the
  server around each load. Requests name the adapter.
- `merged_tensor` (SGLang): the merged model (`merged_weights`, gathered, HF names) through
  `/update_weights_from_tensor`, slime's colocated endpoint, in SGLang's default load format.
- `merged_disk`: the merged model written as an HF folder (a fresh one per version), reloaded
  through SGLang's `/update_weights_from_disk` (slime's disk transport) or vLLM's
  `reload_weights` (`/collective_rpc`, then `/reset_prefix_cache`).
In the merged modes the engine's base is replaced: `restore_base` sends the base back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

MODES = {"sglang": ("adapter", "merged_tensor", "merged_disk"), "vllm": ("adapter", "merged_disk")}
ADAPTER_NAME = "policy"


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _post(url, endpoint, body):
    from engine_servers.http import post

    answer = post(url, endpoint, body, timeout=600)
    if isinstance(answer, dict) and answer.get("success") is False:
        raise RuntimeError(f"{url}/{endpoint} failed: {answer}")
    return answer


class _Sync:
    def __init__(self, engine: str, mode: str, url: str, model, work: str, model_dir: str):
        if mode not in MODES[engine]:
            raise ValueError(f"{engine} has no sync mode {mode!r} here ({MODES[engine]})")
        self.engine, self.mode, self.url, self.model = engine, mode, url, model
        self.work, self.model_dir = Path(work), Path(model_dir)
        self.sent_bytes = 0
        if mode == "adapter":
            from megatron_lora import AdapterSync
            from megatron_lora.sync import engines

            client = (engines.client("sglang_http") if engine == "sglang"
                      else engines.client("vllm", root=self.work / "adapters"))
            client = _CountingBytes(client, self)
            args = SimpleNamespace(use_lora=True, lora_sync="adapter")
            self.adapter_sync = AdapterSync(args, model, name=ADAPTER_NAME, client=client)
            self.adapter_sync.connect([url], paused=[])  # the sync pauses the server itself

    @property
    def adapter(self) -> str | None:
        """The adapter name generation asks for (None: the served model itself)."""
        return ADAPTER_NAME if self.mode == "adapter" else None

    def push(self, version) -> None:
        if self.mode == "adapter":
            self.adapter_sync.push_adapter(dict(self.model.named_parameters()), version)
        else:
            self._push_state(version, merged=True)

    def close(self) -> None:
        """Adapter mode: unload the adapter, so the server holds none for the next user."""
        if self.mode == "adapter" and _rank0():
            self.adapter_sync.unload()

    def restore_base(self) -> None:
        """Merged modes: serve the base model again (the adapter mode never changed it)."""
        if self.mode != "adapter":
            self._push_state("base", merged=False)

    def _push_state(self, version, merged: bool) -> None:
        from megatron_lora.interop import sglang
        from megatron_lora.sync.hf_state import hf_state_dict

        state = hf_state_dict(self.model, merged=merged)
        if not _rank0():
            return
        self.sent_bytes = sum(t.numel() * t.element_size() for t in state.values())
        if self.mode == "merged_tensor":
            _post(self.url, sglang.WEIGHTS_FROM_TENSOR_ENDPOINT,
                  sglang.weights_from_tensor_request(state.items(), version))
            return
        folder = self._write_hf_folder(state, version)
        if self.engine == "sglang":
            _post(self.url, sglang.WEIGHTS_FROM_DISK_ENDPOINT,
                  sglang.weights_from_disk_request(str(folder), version))
        else:
            _post(self.url, "collective_rpc",
                  {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
            _post(self.url, "reset_prefix_cache", {})
        shutil.rmtree(folder)

    def _write_hf_folder(self, state, version) -> Path:
        from safetensors.torch import save_file

        folder = self.work / f"merged-{version}"
        folder.mkdir(parents=True)
        for name in ("config.json", "generation_config.json"):
            if (self.model_dir / name).exists():
                shutil.copy(self.model_dir / name, folder / name)
        save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        (folder / "version.json").write_text(json.dumps({"version": str(version)}))
        return folder


class _CountingBytes:
    """An engine client that records the bytes of each adapter it loads (PEFT tensors)."""

    def __init__(self, client, sync: _Sync):
        self._client, self._sync = client, sync

    def __getattr__(self, name):
        return getattr(self._client, name)

    def load(self, engines, name, adapter, version):
        self._sync.sent_bytes = sum(t.numel() * t.element_size()
                                    for t in adapter.tensors().values())
        self._client.load(engines, name, adapter, version)


def make(engine: str, mode: str, url: str, model, work: str, model_dir: str) -> _Sync:
    return _Sync(engine, mode, url, model, work, model_dir)


def served(sync: _Sync, prompt, adapter: str | None, base_name: str) -> list[float]:
    """The engine's log-probs of `prompt`'s tokens 1..n (one request), with the adapter named
    `adapter` (None: the served model). `base_name`: vLLM's name of the served model."""
    if sync.engine == "sglang":
        from engine_servers.sglang import prompt_logprobs

        values = prompt_logprobs(sync.url, prompt, lora_path=adapter)
    else:
        from engine_servers.vllm import prompt_logprobs

        values = prompt_logprobs(sync.url, prompt, model=adapter or base_name)
    return values[1:]
