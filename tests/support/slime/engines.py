"""The rollout side of slime's weight syncs, standing in for SGLang engines: each records the HF
tensors it is sent, so a test can load them into HF transformers.

slime calls engines as Ray actors (`engine.update_weights_from_tensor.remote(...)`, then
`ray.get`); `RemoteCalls` gives a plain object that interface (the call runs at once, its result
comes back through the stand-in `ray.get`). Only the calls each transport makes exist; anything
else is an AttributeError.
"""

from __future__ import annotations

import json
import os

import torch


class _Method:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        import ray

        # Ray hands an actor the values of ObjectRefs passed as top-level arguments
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
        return ray.put(self._fn(*args, **kwargs))


class RemoteCalls:
    """`obj.name.remote(...)` for every public method `name` of a subclass."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if callable(value) and not name.startswith("_"):
            return _Method(value)
        return value


class _Generation(RemoteCalls):
    def __init__(self):
        self.calls: list[str] = []

    def pause_generation(self):
        self.calls.append("pause_generation")

    def flush_cache(self):
        self.calls.append("flush_cache")

    def continue_generation(self):
        self.calls.append("continue_generation")


def _deserialize(payload: str):
    """`serialized_tensors` read as every SGLang TP rank reads it: SGLang's own
    `MultiprocessingSerializer.deserialize`, from the pinned wheel (`support/sglang_wheel.py`)
    when it is here, else the plain unpickling it amounts to for inline CPU tensors."""
    from support import sglang_wheel

    if sglang_wheel.missing_reason() is None:
        return sglang_wheel.serializer().deserialize(payload), "sglang"
    import base64
    import pickle

    return pickle.loads(base64.b64decode(payload)), "pickle"


class _LoRAServing(_Generation):
    """SGLang's dynamic adapter API as slime's engine actor calls it (`--lora-sync adapter`):
    a name already loaded is refused and an unknown one cannot be unloaded, as in SGLang."""

    def __init__(self):
        super().__init__()
        self.adapters: dict[str, tuple[dict, dict]] = {}  # loaded: name -> (config, tensors)
        self.loads: list[tuple[str, dict, dict[str, torch.Tensor]]] = []
        self.decoder = None

    def load_lora_adapter_from_tensors(self, lora_name, config_dict, serialized_tensors):
        if lora_name in self.adapters:
            raise ValueError(f"Failed to load LoRA adapter {lora_name} because it is already "
                             f"loaded")
        tensors, self.decoder = _deserialize(serialized_tensors)
        self.calls.append(f"load_lora_adapter_from_tensors {lora_name}")
        self.adapters[lora_name] = (config_dict, tensors)
        self.loads.append((lora_name, config_dict, tensors))
        return {"success": True}

    def unload_lora_adapter(self, lora_name):
        if lora_name not in self.adapters:
            raise ValueError(f"LoRA adapter {lora_name} is not loaded")
        self.calls.append(f"unload_lora_adapter {lora_name}")
        del self.adapters[lora_name]

    def update_weight_version(self, new_version):
        self.calls.append(f"update_weight_version {new_version}")


class DistributedEngine(_LoRAServing):
    """A non-colocated engine as the NCCL updater's adapter sync reaches it (HTTP only)."""


class ColocatedEngine(_LoRAServing):
    """`update_weights_from_tensor` as SGLang's colocated engine receives it: one serialized
    flattened bucket per engine TP rank, in the training ranks' order."""

    def __init__(self):
        super().__init__()
        self.received: list[dict[str, torch.Tensor]] = []  # per engine TP rank

    def update_weights_from_tensor(self, serialized_named_tensors, load_format, weight_version):
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        assert load_format == "flattened_bucket", load_format
        self.calls.append(f"update_weights_from_tensor v{weight_version}")
        if not self.received:
            self.received = [{} for _ in serialized_named_tensors]
        for rank, payload in enumerate(serialized_named_tensors):
            data = MultiprocessingSerializer.deserialize(payload)
            bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                           metadata=data["metadata"])
            for name, tensor in bucket.reconstruct_tensors():
                self.received[rank][name] = tensor.clone()


class Lock(RemoteCalls):
    """slime's rollout-engine lock (`slime/ray/utils.Lock`)."""

    def acquire(self):
        return True

    def release(self):
        return None


class DeltaEngine(_Generation):
    """SGLang's `/pull_weights` for `--update-weight-mode delta`: materialize the base from the
    HF checkpoint (version 0), then apply each published version (zstd-compressed xor of the
    bytes, checksum-verified) to it; `update_weights_from_disk` then reloads that checkpoint."""

    def __init__(self, hf_checkpoint: str, delta_dir: str):
        super().__init__()
        self.hf_checkpoint, self.delta_dir = hf_checkpoint, delta_dir
        self.state: dict[str, torch.Tensor] = {}
        self.applied: list[int] = []

    def pull_weights(self, target_version):
        if target_version == 0:
            from safetensors.torch import load_file

            files = [f for f in os.listdir(self.hf_checkpoint) if f.endswith(".safetensors")]
            for name in files:
                self.state.update(load_file(os.path.join(self.hf_checkpoint, name)))
            return True
        import safetensors.numpy
        import zstandard
        from slime.utils.disk_delta import checksum

        version_dir = os.path.join(self.delta_dir, f"weight_v{target_version:06d}")
        with open(os.path.join(version_dir, "model.safetensors.index.json")) as f:
            index = json.load(f)
        meta = index["metadata"]
        assert meta["delta_encoding"] == "xor" and meta["compression_format"] == "zstd", meta
        for fname in sorted(set(index["weight_map"].values())):
            path = os.path.join(version_dir, fname)
            deltas = safetensors.numpy.load_file(path)
            with open(path, "rb") as f:  # the checksums ride in the safetensors metadata
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            digests = header.get("__metadata__", {})
            for name, compressed in deltas.items():
                old = self.state[name]
                raw = old.contiguous().view(torch.uint8).reshape(-1).numpy()
                diff = zstandard.ZstdDecompressor().decompress(compressed.tobytes(),
                                                                max_output_size=raw.size)
                import numpy as np

                new = raw ^ np.frombuffer(diff, dtype=np.uint8)
                if checksum(meta["checksum_format"], new) != digests[name]:
                    raise ValueError(f"checksum mismatch for {name} at version {target_version}")
                self.state[name] = torch.from_numpy(new.copy()).view(old.dtype).view(old.shape)
        self.applied.append(target_version)
        return True

    def update_weights_from_disk(self, model_path, weight_version):
        self.calls.append(f"update_weights_from_disk v{weight_version}")


class LiveEngine:
    """slime's own `SGLangEngine` (its request code, with our patch) pointed at a live SGLang
    server at `url`, called as slime calls its engine actors (`engine.method.remote(...)`, then
    `ray.get`). Built as `SGLangEngine.init` would leave it for an external server, without
    launching one."""

    def __init__(self, args, url: str):
        from urllib.parse import urlsplit

        from slime.backends.sglang_utils.sglang_engine import SGLangEngine

        engine = SGLangEngine(args, rank=0)
        address = urlsplit(url)
        engine.server_host, engine.server_port, engine.node_rank = (address.hostname,
                                                                    address.port, 0)
        self._engine = engine

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self._engine, name))
