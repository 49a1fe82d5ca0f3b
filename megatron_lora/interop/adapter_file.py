"""The adapter checkpoint file: full adapter tensors in one safetensors file, with a header.

Tensor names are the adapters' places in the unsplit model
(`decoder.layers.3.mlp.linear_fc1.lora_B.weight`), whatever the TP, PP or virtual-pipeline
split they were saved from. The safetensors metadata carries a JSON header: the `LoRAConfig`,
the model geometry (enough to split fused adapters offline, e.g. for a PEFT export) and a
SHA-256 of every tensor, so a corrupted file is detected instead of loaded as garbage. Files
are written atomically: a process killed mid-save leaves the previous checkpoint intact.

No model and no Megatron here: reading, verifying and writing the file only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_common import LoRAConfig
from lora_common.atomic import atomic_save_safetensors
from megatron_lora.interop.geometry import Geometry

FORMAT = "megatron-lora-adapter"
FORMAT_VERSION = 1
HEADER_KEY = "megatron_lora"


@dataclass(frozen=True)
class AdapterCheckpoint:
    """An adapter checkpoint in memory: full tensors by name, and its header."""

    tensors: dict[str, torch.Tensor]
    config: LoRAConfig
    geometry: Geometry


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes."""
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def write_adapter_checkpoint(checkpoint: AdapterCheckpoint, path: str | Path) -> None:
    """Write `checkpoint` to `path` atomically."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "lora_config": checkpoint.config.to_dict(),
              "geometry": checkpoint.geometry.to_dict(),
              "sha256": {name: tensor_digest(t) for name, t in checkpoint.tensors.items()}}
    atomic_save_safetensors(checkpoint.tensors, path, metadata={HEADER_KEY: json.dumps(header)})


def read_lora_checkpoint(path: str | Path) -> AdapterCheckpoint:
    """Read and verify an adapter checkpoint (no model needed). Raises `ValueError` naming the
    file and the problem: unreadable or truncated file, foreign format, a tensor whose bytes do
    not match the recorded SHA-256."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: no megatron-lora header; not an adapter checkpoint") from error
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
    digests = header.get("sha256", {})
    if sorted(digests) != sorted(tensors):
        raise ValueError(f"{path}: header lists tensors {sorted(set(digests) ^ set(tensors))} "
                         f"that the file does not hold, or the reverse")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != digests[name]:
            raise ValueError(f"{path}: tensor {name} is corrupted (SHA-256 mismatch)")
    return AdapterCheckpoint(tensors, LoRAConfig.from_dict(header["lora_config"]),
                             Geometry.from_dict(header["geometry"]))
