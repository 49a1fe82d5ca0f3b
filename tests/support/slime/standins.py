"""The smallest stand-ins for what slime imports and this machine cannot run.

    install()   # in a rank process, before slime is imported

- `sglang`, `sglang_router`: SGLang is the rollout engine (GPU kernels, its own server). slime's
  training side imports it for argument definitions (unused with `--debug-train-only`) and for
  the colocated sync's wire format (`FlattenedTensorBucket`, `MultiprocessingSerializer`), which
  is given here as a plain re-implementation of SGLang's: one flat tensor per dtype with
  `(name, shape, dtype, start, end)` metadata, pickled and base64'd.
- `torch_memory_saver`: a CUDA allocator hook; used by slime only with `--offload-train`.
- `wandb`: metrics logging, used by slime only with `--use-wandb`.
- Megatron-LM's `batch_invariant_kernels` (Triton GPU kernels, `import triton` at the top),
  which `megatron/training/initialize.py` imports for `--batch-invariant-mode`. Not `triton`
  itself: torch looks for it and would take a stand-in for the real thing.
- `ray`: the actor runs in-process, not as a Ray actor. `ray.put` / `ray.get` carry plain
  values (the rollout batch, the engine stand-ins' replies); `get_gpu_ids` gives each rank its
  local index, as Ray does with one GPU per actor; `get_node_ip_address` is the loopback.

Every other name in these packages is absent (an `AttributeError` naming the stand-in, which a
`from x import y` turns into the ImportError that slime's fallbacks expect), and each named
placeholder raises `NotImplementedError` when it is used.
"""

from __future__ import annotations

import base64
import importlib.abc
import importlib.machinery
import os
import pickle
import sys
import types

import torch

ROOTS = ("sglang", "sglang_router", "torch_memory_saver", "ray", "wandb")
# Single modules of Megatron-LM that import a GPU-only package at import time.
MODULES = ("megatron.core.transformer.custom_layers.batch_invariant_kernels",)


class Unusable:
    """A name slime imports but must not use here."""

    def __init__(self, name: str, why: str):
        self._name, self._why = name, why

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(f"stand-in {self._name} was used: {self._why}")

    __call__ = _refuse

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotImplementedError(f"stand-in {self._name}.{attr} was used: {self._why}")

    def __repr__(self):
        return f"<stand-in {self._name}>"


# ----- SGLang's colocated-sync wire format ---------------------------------------------------

class FlattenedTensorBucket:
    """SGLang's `weight_sync.tensor_bucket.FlattenedTensorBucket`: tensors of one dtype as one
    flat tensor plus metadata, and back."""

    def __init__(self, named_tensors=None, flattened_tensor=None, metadata=None):
        if named_tensors is not None:
            dtypes = {t.dtype for _, t in named_tensors}
            if len(dtypes) != 1:
                raise ValueError(f"one dtype per bucket, got {dtypes}")
            self.metadata, offset = [], 0
            for name, tensor in named_tensors:
                self.metadata.append((name, tuple(tensor.shape), tensor.dtype, offset,
                                      offset + tensor.numel()))
                offset += tensor.numel()
            self.flattened_tensor = torch.cat([t.detach().reshape(-1) for _, t in named_tensors])
        else:
            self.flattened_tensor, self.metadata = flattened_tensor, metadata

    def get_flattened_tensor(self):
        return self.flattened_tensor

    def get_metadata(self):
        return self.metadata

    def reconstruct_tensors(self):
        return [(name, self.flattened_tensor[start:end].view(shape))
                for name, shape, _dtype, start, end in self.metadata]


class MultiprocessingSerializer:
    """SGLang's `utils.MultiprocessingSerializer` (ForkingPickler there, for CUDA IPC handles;
    plain pickle of CPU tensors here)."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        data = pickle.dumps(obj)
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def deserialize(data):
        if isinstance(data, str):
            data = base64.b64decode(data)
        return pickle.loads(data)


# ----- Ray -----------------------------------------------------------------------------------

class ObjectRef:
    """What the stand-in `ray.put` and the engine stand-ins' `.remote()` calls return."""

    def __init__(self, value):
        self.value = value


def _ray_get(refs, timeout=None):
    if isinstance(refs, list):
        return [_ray_get(ref) for ref in refs]
    if not isinstance(refs, ObjectRef):
        raise NotImplementedError(f"stand-in ray.get was given {refs!r}, not a stand-in ObjectRef: "
                                  f"a real Ray cluster is needed for that")
    return refs.value


class ActorHandle:
    """Annotation-only: slime types its engine handles as `ray.actor.ActorHandle`."""


def _get_gpu_ids():
    return [int(os.environ.get("LOCAL_RANK", "0"))]


def _module_contents() -> dict[str, dict[str, object]]:
    why_sglang = "SGLang needs a GPU; run slime with --debug-train-only here"
    why_ray = "the actor runs in-process here, without a Ray cluster"
    return {
        "sglang.srt.server_args": {"ServerArgs": Unusable("sglang.srt.server_args.ServerArgs",
                                                          why_sglang)},
        "sglang_router.launch_router": {"RouterArgs": Unusable("sglang_router.RouterArgs",
                                                               why_sglang)},
        "sglang.srt.utils": {"MultiprocessingSerializer": MultiprocessingSerializer,
                             "kill_process_tree": Unusable("sglang.srt.utils.kill_process_tree",
                                                           "slime's engine actor does not launch "
                                                           "servers here")},
        # SGLang re-registers torch's CUDA-IPC tensor reductions (device ids by UUID); nothing
        # crosses a process as a CUDA handle here, so there is nothing to patch.
        "sglang.srt.utils.patch_torch": {"monkey_patch_torch_reductions": lambda: None},
        "sglang.srt.weight_sync.tensor_bucket": {"FlattenedTensorBucket": FlattenedTensorBucket},
        "torch_memory_saver": {"torch_memory_saver": Unusable(
            "torch_memory_saver.torch_memory_saver",
            "a CUDA allocator hook, used with --offload-train (not set here)")},
        "ray": {"get": _ray_get, "put": ObjectRef, "ObjectRef": ObjectRef,
                "get_gpu_ids": _get_gpu_ids, "remote": Unusable("ray.remote", why_ray),
                "init": Unusable("ray.init", why_ray), "kill": Unusable("ray.kill", why_ray),
                "nodes": Unusable("ray.nodes", why_ray)},
        "ray.actor": {"ActorHandle": ActorHandle},
        "ray._private.services": {"get_node_ip_address": lambda: "127.0.0.1"},
        MODULES[0]: {name: Unusable(f"{MODULES[0]}.{name}", "Triton kernels need a GPU")
                     for name in ("enable_batch_invariant_mode", "disable_batch_invariant_mode",
                                  "is_batch_invariant_mode_enabled", "set_batch_invariant_mode")},
    }


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"stand-in module {self.__name__} has no {attr!r}: it stands in "
                             f"for a package that cannot run here (see tests/support/slime/"
                             f"standins.py)")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, contents):
        self.contents = contents

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        if fullname.split(".")[0] not in ROOTS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        if spec.name not in MODULES:
            module.__path__ = []  # a package: any submodule resolves through this finder
        module.__dict__.update(self.contents.get(spec.name, {}))
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


def install(live_sglang: bool = False) -> None:
    """Serve the stand-ins for `ROOTS` ahead of anything installed. Idempotent. With
    `live_sglang` (a live SGLang server receives what slime sends), the colocated sync's bucket
    is SGLang's own `FlattenedTensorBucket`, compiled from the pinned wheel, so that the server
    unpickles SGLang's own metadata class; the serializer stays the plain pickle (the CPU tensors'
    bytes inline, where slime's CUDA IPC handles would be file descriptors here)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    for root in ROOTS + MODULES:
        if root in sys.modules:
            raise RuntimeError(f"{root} is already imported; install the stand-ins first")
    contents = _module_contents()
    if live_sglang:
        contents["sglang.srt.weight_sync.tensor_bucket"] = _wheel_module(
            "sglang.srt.weight_sync.tensor_bucket", "srt/weight_sync/tensor_bucket.py")
    sys.meta_path.insert(0, _Finder(contents))


def _wheel_module(name: str, path: str) -> dict[str, object]:
    """The names a module of the pinned SGLang wheel defines, run as `name`."""
    from support import sglang_wheel

    module = types.ModuleType(name)
    sys.modules[name] = module  # while it runs (dataclasses look their module up)
    try:
        exec(compile(sglang_wheel.source(path), f"sglang-{sglang_wheel.VERSION}/{path}", "exec"),
             module.__dict__)
    finally:
        del sys.modules[name]  # the finder serves it, its parents as stand-ins
    return {k: v for k, v in module.__dict__.items() if not k.startswith("__")}
