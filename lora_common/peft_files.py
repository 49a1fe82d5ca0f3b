"""The HuggingFace PEFT adapter format on disk, backend-neutral (no Megatron, no peft import).

A PEFT LoRA adapter is a folder with two files:

- `adapter_config.json`: PEFT's `LoraConfig` as JSON (keys sorted, two-space indent).
- `adapter_model.safetensors`: one `[r, in]` A and one `[out, r]` B per adapted linear, keyed
  `base_model.model.<module>.lora_A.weight` / `...lora_B.weight`, where `<module>` is the
  linear's qualified name in the HuggingFace model (`model.layers.0.self_attn.q_proj`).

This is what `peft.PeftModel.save_pretrained` writes and `PeftModel.from_pretrained` reads,
and what vLLM and SGLang load for serving. Both backends go through this module: `fsdp_lora`
directly, `megatron_lora` after splitting its fused layers into HF modules.

API
---
`adapter_config_dict(config, target_modules, *, exclude_modules=None, task_type="CAUSAL_LM",
base_model_name_or_path=None) -> dict`
    The `adapter_config.json` content PEFT writes for `config`: every key written carries
    the value PEFT itself writes for the same adapter. `target_modules` are HF leaf names
    (`q_proj`); `exclude_modules` the qualified names of linears with such a leaf name that
    carry no adapter (so PEFT adapts exactly the modules that have tensors).

`adapter_tensor_key(module_name, factor) -> str`
    `"base_model.model.<module_name>.lora_<factor>.weight"`, factor `"A"` or `"B"`.

`write_peft_adapter(directory, adapter_config, adapters, shared=None)`
    Writes the two files, each atomically (a reader sees the old file or the new one); the
    weights go first, so a config never points at missing weights. `adapters` maps module
    name -> `(A, B)`; shapes are checked against `adapter_config["r"]` before anything is
    written. `shared` holds MoE factors shared by the experts of a layer in SGLang's form
    (`--experts-shared-outer-loras`): module `model.layers.{l}.mlp.experts.gate_proj` (no
    expert index) -> `(A [1, r, in] or None, B [1, out, r] or None)`; the per-expert modules
    then carry only their other factor (`None` in `adapters`).

`read_peft_adapter(directory) -> PeftAdapter`
    Reads and validates a folder written by PEFT or by `write_peft_adapter`: a LoRA config
    without PEFT features we do not implement (DoRA, trained biases, rank patterns, ...),
    tensor keys of the form above, an A and a B per module with matching rank, and only for
    modules the config targets (PEFT itself would ignore weights for any other module, so
    loading them would compute another model than PEFT's). SGLang's shared expert factors are
    read too: each expert's missing factor is the shared one (`PeftAdapter.shared` names the
    shared modules). Every problem raises `FileNotFoundError` or `ValueError` naming the file,
    field or tensor key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_common.atomic import atomic_save_safetensors, atomic_write_bytes
from lora_common.config import LoRAConfig
from lora_common.targets import matches

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # PEFT's pickle format, read for old adapters only
PEFT_KEY_PREFIX = "base_model.model."

_KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# An MoE expert module (`....experts.<e>.gate_proj`) and the module its experts share
# (`....experts.gate_proj`, SGLang's shared-outer keys hold a [1, ...] tensor there).
_EXPERT_INDEX = re.compile(r"(?<=\.experts)\.\d+(?=\.[^.]+$)")
_SHARED_EXPERT_MODULE = re.compile(r"\.experts\.[^.]+$")


def shared_expert_module(module: str) -> str | None:
    """`...experts.3.gate_proj` -> `...experts.gate_proj`; None for a module of no expert."""
    shared = _EXPERT_INDEX.sub("", module, count=1)
    return shared if shared != module else None

# Fields PEFT writes whose non-default value means a feature this library does not implement;
# loading such an adapter as plain LoRA would compute something else, so it is refused.
_UNSUPPORTED_FIELDS = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "target_parameters": (None, []),
}


def adapter_tensor_key(module_name: str, factor: str) -> str:
    if factor not in ("A", "B"):
        raise ValueError(f"LoRA factor must be 'A' or 'B', got {factor!r}")
    return f"{PEFT_KEY_PREFIX}{module_name}.lora_{factor}.weight"


def _json_number(value: float) -> int | float:
    # PEFT types lora_alpha as int; write 32, not 32.0, when it is integral.
    return int(value) if float(value).is_integer() else float(value)


def adapter_config_dict(
    config: LoRAConfig,
    target_modules: Iterable[str],
    *,
    exclude_modules: Iterable[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """`adapter_config.json` for `config` adapting `target_modules` (HF leaf names)."""
    targets = sorted(set(target_modules))
    if not targets:
        raise ValueError("adapter_config_dict: target_modules is empty")
    excludes = sorted(set(exclude_modules or ())) or None
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": excludes,
        "fan_in_fan_out": False,
        "inference_mode": True,
        # PEFT's value for its default (kaiming-uniform A) init is `true`; "gaussian" is ours too.
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _json_number(config.alpha),
        "lora_bias": False,
        "lora_dropout": float(config.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": config.use_rslora,
    }


def write_peft_adapter(
    directory: str | os.PathLike,
    adapter_config: Mapping[str, Any],
    adapters: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    shared: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` into `directory`."""
    r = adapter_config["r"]
    shared = shared or {}
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in shared.items():
        for factor, tensor in zip("AB", pair, strict=True):
            if tensor is None:
                continue
            key = adapter_tensor_key(module, factor)
            rank = tensor.shape[1] if factor == "A" else tensor.shape[-1]
            if tensor.dim() != 3 or tensor.shape[0] != 1 or rank != r or \
                    not _SHARED_EXPERT_MODULE.search(module):
                raise ValueError(f"{key}: a factor shared by a layer's experts is [1, r={r}, in] "
                                 f"(A) or [1, out, r={r}] (B) under ...experts.<module>, got "
                                 f"{list(tensor.shape)}")
            tensors[key] = tensor
    for module, (lora_a, lora_b) in adapters.items():
        key_a, key_b = adapter_tensor_key(module, "A"), adapter_tensor_key(module, "B")
        for factor, tensor, key in (("A", lora_a, key_a), ("B", lora_b, key_b)):
            if tensor is None:
                owner = shared.get(shared_expert_module(module) or "", (None, None))
                if owner["AB".index(factor)] is None:
                    raise ValueError(f"{key} is missing and no shared expert factor holds it")
                continue
            rank_ok = tensor.shape[0] == r if factor == "A" else tensor.shape[1] == r
            if tensor.dim() != 2 or not rank_ok:
                wanted = f"[r={r}, in]" if factor == "A" else f"[out, r={r}]"
                raise ValueError(f"{key}: expected shape {wanted}, got {list(tensor.shape)}")
            tensors[key] = tensor
    if not tensors:
        raise ValueError("write_peft_adapter: no adapters to write")
    directory = Path(directory)
    atomic_save_safetensors(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    text = json.dumps(dict(adapter_config), indent=2, sort_keys=True)
    atomic_write_bytes(directory / ADAPTER_CONFIG_FILE, text.encode())


@dataclass(frozen=True)
class PeftAdapter:
    """A validated PEFT LoRA adapter: its config dict and `{module name: (A [r, in], B [out, r])}`
    (a factor the experts of a layer share, in SGLang's form, given to each expert), and the
    shared expert modules (`{...experts.gate_proj: "A"}`: the factor they hold)."""

    directory: Path
    config: dict[str, Any]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shared: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def r(self) -> int:
        return self.config["r"]

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def weights_file(self) -> Path:
        path = self.directory / ADAPTER_WEIGHTS_FILE
        return path if path.exists() else self.directory / LEGACY_WEIGHTS_FILE

    def lora_config(self) -> LoRAConfig:
        """The `LoRAConfig` of this adapter; targets are the leaf names of its modules."""
        return LoRAConfig(
            r=self.r, alpha=self.alpha, dropout=float(self.config.get("lora_dropout", 0.0)),
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in self.adapters}),
            use_rslora=self.use_rslora,
            init="gaussian" if self.config.get("init_lora_weights") == "gaussian" else "kaiming",
        )


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def _matches_any(module: str, names: str | list[str] | None) -> bool:
    """PEFT's rule: a string is a regex the whole module name must match; a list entry matches
    a module whose name equals it or ends with `.<entry>`."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(matches(name, module) for name in names)


def targeted_by(module: str, config: Mapping[str, Any]) -> bool:
    """Whether PEFT, given `config`, puts an adapter on the module named `module`."""
    if not _matches_any(module, config.get("target_modules")):
        return False
    if _matches_any(module, config.get("exclude_modules")):
        return False
    layers = config.get("layers_to_transform")
    if layers is None:
        return True
    index = _LAYER_INDEX.search(module)
    layers = [layers] if isinstance(layers, int) else layers
    return index is not None and int(index.group(1)) in layers


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"PEFT adapter: {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{path}: r must be a positive int, got {r!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{path}: lora_alpha must be a number > 0, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"{path}: target_modules must be a non-empty list of module names (or "
                         f"a regex string), got {targets!r}")
    for field, plain_values in _UNSUPPORTED_FIELDS.items():
        value = config.get(field, plain_values[0])
        if value not in plain_values:
            raise ValueError(f"{path}: {field}={value!r} is a PEFT feature this library does not "
                             f"implement (plain LoRA has {plain_values[0]!r})")
    return config


def _read_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = directory / ADAPTER_WEIGHTS_FILE
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return path, load_file(path)
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    legacy = directory / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"PEFT adapter: neither {path} nor {legacy} exists")


def read_peft_adapter(directory: str | os.PathLike) -> PeftAdapter:
    """Read and validate the PEFT LoRA adapter in `directory` (see the module docstring)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"PEFT adapter: {directory} is not a directory")
    config = _read_config(directory / ADAPTER_CONFIG_FILE)
    r = config["r"]
    path, tensors = _read_tensors(directory)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    shared_factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise ValueError(f"{path}: tensor key {key!r} is not a LoRA factor "
                             f"('{PEFT_KEY_PREFIX}<module>.lora_A.weight' or '.lora_B.weight')")
        factor, module = match["factor"], match["module"]
        if tensor.dim() == 3 and tensor.shape[0] == 1 and _SHARED_EXPERT_MODULE.search(module):
            tensor = tensor[0]  # SGLang's factor shared by the experts of a layer
            shared_factors.setdefault(module, {})[factor] = tensor
        elif tensor.dim() != 2:
            raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, expected 2 dims "
                             f"(or [1, ...] for a factor the experts share, under "
                             f"...experts.<module>)")
        rank = tensor.shape[0] if factor == "A" else tensor.shape[1]
        if rank != r:
            raise ValueError(f"{path}: {key} has shape {list(tensor.shape)}, whose rank "
                             f"{rank} is not r={r} of {ADAPTER_CONFIG_FILE}")
        if module not in shared_factors:
            factors.setdefault(module, {})[factor] = tensor
    if not factors:
        raise ValueError(f"{path}: holds no LoRA tensors")
    adapters = {}
    for module, pair in sorted(factors.items()):
        if not targeted_by(module, config):
            raise ValueError(f"{path}: {adapter_tensor_key(module, 'A')} is for a module that "
                             f"{ADAPTER_CONFIG_FILE} does not target (target_modules="
                             f"{config['target_modules']!r}, exclude_modules="
                             f"{config.get('exclude_modules')!r}, layers_to_transform="
                             f"{config.get('layers_to_transform')!r})")
        owner = shared_factors.get(shared_expert_module(module) or "", {})
        for factor in ("A", "B"):
            if factor in pair and factor in owner:
                raise ValueError(f"{path}: {adapter_tensor_key(module, factor)} is given per "
                                 f"expert and shared by the experts")
            if factor not in pair and factor not in owner:
                raise ValueError(f"{path}: {adapter_tensor_key(module, factor)} is missing "
                                 f"(its other factor is present)")
        adapters[module] = (pair.get("A", owner.get("A")), pair.get("B", owner.get("B")))
    used = {shared_expert_module(module) for module in adapters}
    for module, held in shared_factors.items():
        if module not in used:
            raise ValueError(f"{path}: {adapter_tensor_key(module, next(iter(held)))} is shared "
                             f"by experts the adapter has no other factor for")
        if len(held) == 2:
            raise ValueError(f"{path}: {module} shares both A and B: not an expert adapter")
    shared = {module: next(iter(held)) for module, held in sorted(shared_factors.items())}
    return PeftAdapter(directory=directory, config=config, adapters=adapters, shared=shared)
