"""SGLang's adapter-loading API (v0.5.15.post1, the version slime 624b824a's image pins), as the
adapter sync feeds it: the request, the payload, the config SGLang reads, the server flags.
No SGLang, Megatron or Ray import; where each fact is in SGLang's source: patches/README.md,
"Adapter-only sync: what SGLang does".

- `POST /load_lora_adapter_from_tensors` takes `{lora_name, config_dict, serialized_tensors}`;
  `serialized_tensors` is ONE string that every TP rank of the engine deserializes (with
  `MultiprocessingSerializer.deserialize`: base64, then its restricted unpickler), and each rank
  slices the full tensors for itself. ForkingPickler's CPU tensors travel as file descriptors
  that can be received once, so the second TP rank would fail; a plain pickle carries the bytes
  inline, which any number of ranks (on any node) can read.
- A name already loaded is refused: each sync unloads, then loads (`unload_lora_adapter` waits
  for the adapter's in-flight requests; slime pauses in abort mode, so there are none).
- SGLang's scaling is `lora_alpha / r` whatever `use_rslora` says; an rsLoRA adapter is sent
  with `lora_alpha * sqrt(r)` so that SGLang computes `alpha / sqrt(r)`.
- Generation names the adapter in `/generate`'s `lora_path` (the name, not a path).
"""

from __future__ import annotations

import base64
import contextlib
import math
import pickle
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# The one name the trained adapter is loaded under (and generation asks for).
ADAPTER_NAME = "policy"

# Endpoints of SGLang's HTTP server the sync calls (slime's engine actor POSTs JSON to them).
LOAD_ENDPOINT = "load_lora_adapter_from_tensors"
UNLOAD_ENDPOINT = "unload_lora_adapter"
WEIGHT_VERSION_ENDPOINT = "update_weight_version"
# The merged sync's endpoints: slime's colocated path, and its disk path.
WEIGHTS_FROM_TENSOR_ENDPOINT = "update_weights_from_tensor"
WEIGHTS_FROM_DISK_ENDPOINT = "update_weights_from_disk"
# The ServerArgs fields `server_flag_problems` reads.
SERVER_FLAGS = ("enable_lora", "max_lora_rank", "lora_target_modules", "dp_size",
                "max_loaded_loras")


# SGLang fuses q/k/v and gate/up into one LoRA slot each; a server target list is compared in
# these fused names (its get_normalized_target_modules).
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


# What SGLang's LoRAConfig reads from `config_dict`; each is checked before anything is sent.
REQUIRED_CONFIG_KEYS = ("r", "lora_alpha", "target_modules")


def _module_names(value, what: str) -> list[str]:
    """A list of module names (a single string would be read letter by letter downstream)."""
    if isinstance(value, str) or not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ValueError(f"{what} must be a list of module names, got {value!r} "
                         f"({type(value).__name__})")
    names = list(value)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if not names or bad:
        raise ValueError(f"{what} must be a non-empty list of module names, got {names!r}")
    return names


def check_adapter_config(config, what: str) -> None:
    """Refuse an adapter config SGLang would misread, naming the key: not a mapping, a required
    key missing, `r` not a positive int (rsLoRA's `lora_alpha * sqrt(r)` would be 0),
    `lora_alpha` not a finite positive number, `target_modules` not a list of names,
    `use_rslora` not a bool."""
    if not isinstance(config, Mapping):
        raise TypeError(f"{what}: the adapter config must be a mapping (PEFT's adapter_config), "
                        f"got {type(config).__name__}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{what}: the adapter config lacks {', '.join(missing)}")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{what}: the adapter config's r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{what}: the adapter config's lora_alpha must be a finite number > 0, "
                         f"got {alpha!r}")
    _module_names(config["target_modules"], f"{what}: the adapter config's target_modules")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{what}: the adapter config's use_rslora must be a bool, got "
                         f"{config['use_rslora']!r}")


def normalized_targets(modules: Iterable[str]) -> set[str]:
    """HF leaf names as SGLang's LoRA memory pool names them (q_proj -> qkv_proj, ...)."""
    return {_FUSED.get(m, m) for m in _module_names(modules, "normalized_targets: modules")}


def serving_config(peft_config: Mapping[str, Any]) -> dict[str, Any]:
    """The `config_dict` to send for a PEFT `adapter_config`: the same adapter as SGLang
    computes it. rsLoRA is folded into `lora_alpha` (SGLang ignores `use_rslora`)."""
    check_adapter_config(peft_config, "serving_config")
    config = dict(peft_config)
    config["target_modules"] = list(config["target_modules"])
    if config.get("use_rslora"):
        alpha = config["lora_alpha"] * math.sqrt(config["r"])
        config["lora_alpha"] = int(alpha) if float(alpha).is_integer() else alpha
        config["use_rslora"] = False
    return config


def scaling(config: Mapping[str, Any]) -> float:
    """The scaling SGLang applies for a `config_dict` (`lora_alpha / r`)."""
    check_adapter_config(config, "scaling")
    return config["lora_alpha"] / config["r"]


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """`serialized_tensors` for `{PEFT key: tensor}`: base64 of a plain pickle of contiguous
    CPU tensors (bytes inline: readable by every TP rank of the engine, on any node). Every
    value must be a floating-point tensor with values, under a string key; the first that is
    not is named."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"encode_tensors: tensors must be a mapping of PEFT keys to tensors, got "
                        f"{type(tensors).__name__}")
    if not tensors:
        raise ValueError("encode_tensors: no tensors to send")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"encode_tensors: tensor keys must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"encode_tensors: {name} is a {type(tensor).__name__}, not a "
                            f"torch.Tensor")
        if tensor.is_meta:
            raise ValueError(f"encode_tensors: {name} is a meta tensor, which has no values")
        if not tensor.is_floating_point():
            raise ValueError(f"encode_tensors: {name} has dtype {tensor.dtype}; adapter matrices "
                             f"are floating point")
    compact: dict[int, torch.Tensor] = {}  # by id: a tensor sent under several keys goes once
    plain = {name: compact.setdefault(id(t), _own_storage(t)) for name, t in tensors.items()}
    return _encode(plain)


def _encode(obj) -> str:
    with _torch_storage_reduction():
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return base64.b64encode(data).decode()


def weights_from_tensor_request(named_tensors: Iterable[tuple[str, torch.Tensor]], version,
                                tp_size: int = 1) -> dict[str, Any]:
    """The JSON body of `POST /update_weights_from_tensor` in SGLang's default load format:
    every engine TP rank reads the same list of `(HF name, full tensor)` pairs, bytes inline,
    and loads it through the model's `load_weights`. (slime's colocated sync sends a flattened
    bucket of CUDA IPC handles instead, one per rank: on a CPU those would be file descriptors,
    which a process that is not the sender's child cannot receive.)"""
    payload = _encode([(name, _own_storage(t)) for name, t in named_tensors])
    return {"serialized_named_tensors": [payload] * tp_size, "load_format": None,
            "flush_cache": True, "weight_version": str(version)}


def weights_from_disk_request(model_path: str, version) -> dict[str, Any]:
    """The JSON body of `POST /update_weights_from_disk`: reload the weights of an HF folder
    (slime's `--update-weight-transport disk`)."""
    return {"model_path": str(model_path), "weight_version": str(version), "flush_cache": True}


_REDUCTION_LOCK = threading.Lock()


@contextlib.contextmanager
def _torch_storage_reduction():
    """Pickle storages as torch does, by `torch.storage._load_from_bytes`. megatron-core 0.19
    replaces that function with its own (`megatron.core.safe_globals.safe_load_from_bytes`),
    so a storage pickled in a trainer that imported it names a megatron class, which SGLang's
    restricted unpickler refuses. Only the name is pickled: SGLang calls its own torch's."""
    current = torch.storage._load_from_bytes
    if current.__module__ == "torch.storage":
        yield
        return

    def _load_from_bytes(b):  # what the pickle names; the receiver resolves torch's own
        return current(b)

    _load_from_bytes.__module__, _load_from_bytes.__qualname__ = "torch.storage", "_load_from_bytes"
    with _REDUCTION_LOCK:
        torch.storage._load_from_bytes = _load_from_bytes
        try:
            yield
        finally:
            torch.storage._load_from_bytes = current


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU in a storage of its own size: pickle writes a tensor's whole storage,
    and a PEFT B split from a fused B is a view of all of it (q/k/v would each carry the fused
    B)."""
    tensor = tensor.detach().to("cpu")
    nbytes = tensor.numel() * tensor.element_size()
    if (tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == nbytes):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def lora_load_request(config_dict: Mapping[str, Any], serialized_tensors: str,
                 name: str = ADAPTER_NAME) -> dict[str, Any]:
    """The JSON body of `POST /load_lora_adapter_from_tensors`."""
    check_adapter_config(config_dict, "lora_load_request")
    if not isinstance(serialized_tensors, str) or not serialized_tensors:
        raise ValueError(f"lora_load_request: serialized_tensors must be the non-empty string "
                         f"encode_tensors returns, got {type(serialized_tensors).__name__}")
    return {"lora_name": _adapter_name(name, "lora_load_request"),
            "config_dict": dict(config_dict), "serialized_tensors": serialized_tensors}


def lora_unload_request(name: str = ADAPTER_NAME) -> dict[str, Any]:
    """The JSON body of `POST /unload_lora_adapter`."""
    return {"lora_name": _adapter_name(name, "lora_unload_request")}


def _adapter_name(name, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: the adapter name must be a non-empty string, got {name!r}")
    return name


def weight_version_request(version) -> dict[str, Any]:
    """The JSON body of `POST /update_weight_version` (generation is paused: abort nothing)."""
    return {"new_version": str(version), "abort_all_requests": False}


def server_flag_problems(*, r: int, target_modules: Iterable[str], enable_lora,
                         max_lora_rank, lora_target_modules, dp_size, max_loaded_loras,
                         prefix: str = "--") -> list[str]:
    """What keeps an SGLang server started with these arguments from serving an adapter of rank
    `r` on the HF modules `target_modules` (q_proj, ...), loaded from tensors at each sync.
    Flags are named with `prefix` (slime passes SGLang's flags on as `--sglang-*`)."""
    def flag(field):
        return prefix + field.replace("_", "-")

    # flags of the wrong type (a YAML config's "16"), named rather than compared
    problems = [f"{flag(field)} must be an int, got {value!r} ({type(value).__name__})"
                for field, value in (("max_lora_rank", max_lora_rank), ("dp_size", dp_size),
                                     ("max_loaded_loras", max_loaded_loras))
                if value is not None and (isinstance(value, bool) or not isinstance(value, int))]
    if lora_target_modules is not None:
        try:
            _module_names(lora_target_modules, flag("lora_target_modules"))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        return problems
    if not enable_lora:
        problems.append(f"{flag('enable_lora')} is off: SGLang refuses adapter loads without it")
    if max_lora_rank is None or max_lora_rank < r:
        problems.append(f"{flag('max_lora_rank')} is {max_lora_rank}, the adapter's rank is {r} "
                        f"(without {flag('lora_paths')} SGLang needs both "
                        f"{flag('max_lora_rank')} and {flag('lora_target_modules')})")
    served = set(lora_target_modules or ())
    missing = sorted(normalized_targets(target_modules) - normalized_targets(served))
    if "all" not in served and missing:
        problems.append(f"{flag('lora_target_modules')} {sorted(served) or None} lacks {missing}")
    if dp_size not in (None, 1):
        problems.append(f"{flag('dp_size')} is {dp_size}: SGLang loads and unloads adapters only "
                        f"at dp_size 1")
    if max_loaded_loras is not None:
        problems.append(f"{flag('max_loaded_loras')} is {max_loaded_loras}: an adapter it evicts "
                        f"is reloaded from its path, which a tensor-loaded adapter does not have")
    return problems
