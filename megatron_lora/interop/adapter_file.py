"""The adapter checkpoint file: full adapter tensors in one safetensors file, with a header.

Tensor names are the adapters' places in the unsplit model
(`decoder.layers.3.mlp.linear_fc1.lora_B.weight`), whatever the TP, PP or virtual-pipeline
split they were saved from. The safetensors metadata carries a JSON header: the `LoRAConfig`,
the model geometry (enough to split fused adapters offline, e.g. for a PEFT export) and a
SHA-256 of every tensor, plus a SHA-256 of the header itself, so a corrupted file (a flipped
byte in a tensor, or a flipped digit of `alpha`) is refused instead of loaded as another
adapter. Files are written atomically: a process killed mid-save leaves the previous
checkpoint intact.

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
from megatron_lora.interop.adapter_keys import EXPERTS, AdapterKey, parse_adapter_key
from megatron_lora.interop.geometry import Geometry

FORMAT = "megatron-lora-adapter"
FORMAT_VERSION = 2       # 2 added the header digest; version 1 files (no digest) still read
HEADER_KEY = "megatron_lora"
HEADER_DIGEST_KEY = "megatron_lora_sha256"  # SHA-256 of the header's JSON text, as stored
HEADER_FIELDS = {"format": str, "format_version": int, "lora_config": dict, "geometry": dict,
                 "sha256": dict}


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
    atomic_save_safetensors(checkpoint.tensors, path, metadata=header_metadata(header))


def header_metadata(header: dict) -> dict[str, str]:
    """The safetensors metadata that carries `header`: its JSON text and that text's SHA-256."""
    text = json.dumps(header, sort_keys=True)
    return {HEADER_KEY: text, HEADER_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}


def read_lora_checkpoint(path: str | Path) -> AdapterCheckpoint:
    """Read and verify an adapter checkpoint (no model needed). Raises `ValueError` naming the
    file and the problem: unreadable or truncated file, foreign format, a header that does not
    match its SHA-256 or lacks a field, a tensor whose bytes do not match its SHA-256."""
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
    header = _read_header(metadata, path)
    digests = header["sha256"]
    if sorted(digests) != sorted(tensors):
        raise ValueError(f"{path}: header lists tensors {sorted(set(digests) ^ set(tensors))} "
                         f"that the file does not hold, or the reverse")
    for name, tensor in tensors.items():
        if tensor_digest(tensor) != digests[name]:
            raise ValueError(f"{path}: tensor {name} is corrupted (SHA-256 mismatch)")
    try:
        config = LoRAConfig.from_dict(header["lora_config"], require_all=True)
        geometry = Geometry.from_dict(header["geometry"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: header: {error}") from error
    checkpoint = AdapterCheckpoint(tensors, config, geometry)
    problems = header_problems(checkpoint)
    if problems:
        more = f" and {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ValueError(f"{path}: the tensors do not fit the header: "
                         + "; ".join(problems[:4]) + more)
    return checkpoint


def header_problems(checkpoint: AdapterCheckpoint) -> list[str]:
    """Every way the tensors disagree with the header's config and geometry: a name that is no
    adapter, a layer or expert the geometry lacks, a matrix that is not floating point, of
    another rank or of another width than the geometry's linear, a module with only one of its
    matrices, and the routed experts of a layer other than all of the geometry's (or one matrix
    they share). What an export writes and `inspect` reports is then what the file holds."""
    geometry, r = checkpoint.geometry, checkpoint.config.r
    keys, problems = {}, []
    for name in sorted(checkpoint.tensors):
        try:
            keys[name] = parse_adapter_key(name)
        except ValueError as error:
            problems.append(str(error))
    # linear_proj's input is heads x kv_channels in standard attention only (MLA's is heads x
    # v_head_dim, which the geometry does not hold): checked where linear_qkv shows the kind
    attention = "standard" if any(k.target == "linear_qkv" for k in keys.values()) else "mla"
    held: dict[AdapterKey, dict[str, set]] = {}  # module -> matrix -> experts holding it
    for name, key in keys.items():
        tensor = checkpoint.tensors[name]
        if key.layer >= geometry.num_layers:
            problems.append(f"{name} is for layer {key.layer}; the header's geometry has "
                            f"{geometry.num_layers} layers")
            continue
        try:
            width = geometry.features(key.target, key.kind, attention)
        except ValueError as error:  # an MLP kind the geometry has no ffn width for
            problems.append(f"{name}: {error}")
            continue
        if key.projection is not None:  # canonical: the projection's own rows
            width = (width[0], _projection_rows(key.target, key.projection, geometry))
        expected = (r, width[0]) if key.matrix == "A" else (width[1], r)
        if not tensor.is_floating_point():
            problems.append(f"{name} has dtype {tensor.dtype}; adapter matrices are floating "
                            f"point")
        if tensor.dim() != 2 or any(e is not None and e != n
                                    for e, n in zip(expected, tensor.shape, strict=True)):
            wanted = ["?" if e is None else e for e in expected]
            problems.append(f"{name} has shape {list(tensor.shape)}; the header's config and "
                            f"geometry give {wanted}")
        module = AdapterKey(key.layer, key.kind, key.target, "A", None, key.projection)
        held.setdefault(module, {}).setdefault(key.matrix, set()).add(key.expert)
    count = geometry.num_moe_experts
    for module, matrices in sorted(held.items(), key=lambda item: item[0].name):
        where = module.name.removesuffix(".lora_A.weight")
        if set(matrices) != {"A", "B"}:
            problems.append(f"{where} has only lora_{''.join(matrices)}")
        for matrix, experts in sorted(matrices.items()):
            # every expert's, or one matrix the layer's experts share (shared_outer)
            if module.kind == EXPERTS and experts != {None} and experts != set(range(count or 0)):
                numbered = sorted(e for e in experts if e is not None)
                problems.append(f"{where}'s lora_{matrix} is held for experts "
                                f"{_ranges(numbered)}; the header's geometry has "
                                f"num_moe_experts={count}")
    return problems


def _projection_rows(target: str, projection: str, geometry: Geometry) -> int:
    """The rows of one projection of a fused linear (canonical LoRA's B)."""
    if target == "linear_fc1":
        return geometry.ffn_hidden_size
    heads = geometry.num_attention_heads if projection == "q" else geometry.num_query_groups
    return heads * geometry.kv_channels


def _ranges(indices: list[int]) -> str:
    """`0..3, 5` for [0, 1, 2, 3, 5]."""
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(str(start) if start == index else f"{start}..{index}")
            start = None
    return ", ".join(spans) or "none"


def _read_header(metadata: dict, path: Path) -> dict:
    """The JSON header, verified against its digest, with every field present and typed."""
    text = metadata.get(HEADER_KEY)
    if text is None:
        raise ValueError(f"{path}: no megatron-lora header; not an adapter checkpoint")
    digest = metadata.get(HEADER_DIGEST_KEY)
    if digest is not None and hashlib.sha256(text.encode()).hexdigest() != digest:
        raise ValueError(f"{path}: the header is corrupted (its SHA-256 does not match)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a {type(header).__name__}, not a JSON object")
    if header.get("format") != FORMAT or header.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: format {header.get('format')!r} version "
                         f"{header.get('format_version')!r}; expected {FORMAT!r} {FORMAT_VERSION}")
    if digest is None and header["format_version"] != 1:
        raise ValueError(f"{path}: the header's SHA-256 ({HEADER_DIGEST_KEY}) is missing")
    problems = [f"{field} is missing" if field not in header else
                f"{field} is a {type(header[field]).__name__}, not a {kind.__name__}"
                for field, kind in HEADER_FIELDS.items()
                if not isinstance(header.get(field), kind) or isinstance(header.get(field), bool)]
    if problems:
        raise ValueError(f"{path}: header field(s): " + "; ".join(problems))
    return header
