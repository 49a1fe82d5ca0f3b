"""Megatron GPT <-> HuggingFace Llama-family names and tensor layouts, written once (the
architectures: `architectures.py`; the MoE experts' names: `hf_experts.py`).

Used by the PEFT export and import (and by the tests that convert an HF model into a Megatron
`GPTModel`). No transformers or Megatron import: the functions take names, plain tensors and
a `Geometry`, so an exporter can run offline from a checkpoint's header.

Three things differ between the two worlds:

- names: `decoder.layers.{i}.self_attention.linear_qkv` vs `model.layers.{i}.self_attn.q_proj`...
- fusion: Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`; HF keeps them
  apart. Megatron's fused q/k/v rows are interleaved per query group,
  `[q heads of group 0; k_0; v_0; q heads of group 1; k_1; v_1; ...]` (this is what lets a
  column-parallel split hand every rank whole groups); the full `linear_fc1` is `[gate; up]`
  (`lora_common/fused_rows.py` holds both layouts).
- per-architecture extras: Qwen2 has q/k/v biases, Qwen3 normalizes each head's q and k.
- multi-latent attention (DeepSeek-V3; `attention="mla"`): one HF module per Megatron linear,
  nothing fused (`q_a_proj` <-> `linear_q_down_proj`, ...). HF's `q_proj` is then MLA's
  uncompressed q (`linear_q_proj`), not a third of `linear_qkv`, so reading HF names needs the
  attention kind; Megatron names are unambiguous.
- canonical LoRA (`lora_common.targets`): a projection's adapter inside a fused Megatron module
  (`linear_qkv.lora_q`) is its HF module's adapter (`q_proj`) as it is, nothing to split.

All layout functions act on full (unsharded) tensors along dim 0, so the same call handles a
weight `[out, in]`, a bias `[out]` and a LoRA B `[out, r]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from lora_common.fused_rows import RowLayout
from lora_common.targets import PROJECTION_TARGETS, PROJECTIONS
from megatron_lora.interop.geometry import Geometry

# --- layouts -------------------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, num_heads: int, num_query_groups: int, kv_channels: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's q, k, v (rows in head order) from Megatron's fused `linear_qkv` rows
    `[q heads of group g; k_g; v_g]` for each group g. Works for MHA (groups == heads)."""
    layout = _qkv_layout(num_heads, num_query_groups, kv_channels, "split_qkv")
    _rows(fused, sum(layout.group_rows) * num_query_groups, "split_qkv fused tensor")
    return layout.split(fused)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_query_groups: int, kv_channels: int) -> torch.Tensor:
    """Inverse of `split_qkv`: Megatron's per-group interleaved `linear_qkv` rows."""
    layout = _qkv_layout(num_heads, num_query_groups, kv_channels, "fuse_qkv")
    _rows(q, num_heads * kv_channels, "fuse_qkv q")
    _rows(k, num_query_groups * kv_channels, "fuse_qkv k")
    _rows(v, num_query_groups * kv_channels, "fuse_qkv v")
    try:
        return layout.interleave([q, k, v])
    except ValueError as error:
        raise ValueError(f"fuse_qkv: {error}") from None


def split_fc1(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's gate and up from the full Megatron SwiGLU `linear_fc1` `[gate; up]`."""
    if fused.dim() == 0 or fused.shape[0] % 2:
        raise ValueError(f"split_fc1: fused fc1 needs an even number of rows, got shape "
                         f"{tuple(fused.shape)}")
    return RowLayout.fc1().split(fused)


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_fc1`."""
    if gate.shape != up.shape:
        raise ValueError(f"fuse_fc1: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return RowLayout.fc1().interleave([gate, up])


def _qkv_layout(num_heads: int, num_query_groups: int, kv_channels: int, what: str) -> RowLayout:
    try:
        return RowLayout.qkv(num_heads, num_query_groups, kv_channels)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def _rows(tensor: torch.Tensor, expected: int, what: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] != expected:
        raise ValueError(f"{what}: expected {expected} rows (dim 0), "
                         f"got shape {tuple(tensor.shape)}")


# --- LoRA target modules -------------------------------------------------------------------

# Megatron target -> (its path inside a decoder layer, the HF paths inside an HF layer).
_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_qkv": ("self_attention.linear_qkv",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "linear_proj": ("self_attention.linear_proj", ("self_attn.o_proj",)),
    "linear_fc1": ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
    "linear_fc2": ("mlp.linear_fc2", ("mlp.down_proj",)),
}
# Multi-latent attention (megatron-core's MLASelfAttention, HF DeepseekV3Attention): 1:1. Its
# linear_proj and MLP are the table above's.
_MLA_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_q_proj": ("self_attention.linear_q_proj", ("self_attn.q_proj",)),
    "linear_q_down_proj": ("self_attention.linear_q_down_proj", ("self_attn.q_a_proj",)),
    "linear_q_up_proj": ("self_attention.linear_q_up_proj", ("self_attn.q_b_proj",)),
    "linear_kv_down_proj": ("self_attention.linear_kv_down_proj",
                            ("self_attn.kv_a_proj_with_mqa",)),
    "linear_kv_up_proj": ("self_attention.linear_kv_up_proj", ("self_attn.kv_b_proj",)),
}
_STANDARD_ATTENTION = ("linear_qkv",)
# The targets whose input is the hidden state (a layer's normalized input).
HIDDEN_INPUT_TARGETS = ("linear_qkv", "linear_fc1", "linear_q_proj", "linear_q_down_proj",
                        "linear_kv_down_proj")
TARGETS = tuple(_TARGETS)  # the Megatron targets of Llama-family models that have HF counterparts
MLA_TARGETS = tuple(_MLA_TARGETS)
_TARGETS = {**_TARGETS, **_MLA_TARGETS}  # Megatron names are unique across attention kinds
# attention kind -> HF leaf -> the Megatron target that holds it.
_HF_LEAF_TARGET = {
    kind: {path.rsplit(".", 1)[1]: target for target, (_, paths) in _TARGETS.items()
           for path in paths if target not in excluded}
    for kind, excluded in (("standard", MLA_TARGETS), ("mla", _STANDARD_ATTENTION))}

# Wrappers put these in front of Megatron names (DDP, Float16Module) and of HF names
# (PEFT's `base_model.model.`).
_MEGATRON_PREFIX = r"^(?:module\.)*"
_HF_PREFIX = r"^(?:base_model\.model\.)?"
_MEGATRON_MODULE = re.compile(
    _MEGATRON_PREFIX + r"decoder\.layers\.(\d+)\.("
    + "|".join(re.escape(path) for path, _ in _TARGETS.values()) + r")$")
_HF_MODULE = re.compile(
    _HF_PREFIX + r"model\.layers\.(\d+)\.("
    + "|".join(sorted({re.escape(p) for _, paths in _TARGETS.values() for p in paths}))
    + r")$")


def _check_target(target: str) -> None:
    if target not in _TARGETS:
        raise ValueError(f"unknown Megatron LoRA target {target!r}; known: {', '.join(_TARGETS)}")


def hf_leaves(target: str) -> tuple[str, ...]:
    """The HF leaf names one Megatron target becomes: linear_qkv -> (q_proj, k_proj, v_proj)."""
    _check_target(target)
    return tuple(path.rsplit(".", 1)[1] for path in _TARGETS[target][1])


def megatron_module_name(layer: int, target: str) -> str:
    """`decoder.layers.{layer}.self_attention.linear_qkv` and the like."""
    _check_target(target)
    return f"decoder.layers.{layer}.{_TARGETS[target][0]}"


def hf_module_names(layer: int, target: str) -> tuple[str, ...]:
    """The HF modules (as named inside `*ForCausalLM`) one Megatron target becomes; a canonical
    projection target (`linear_q`) becomes its own HF module."""
    if target in PROJECTION_TARGETS:
        return (hf_projection_module(layer, *PROJECTION_TARGETS[target]),)
    _check_target(target)
    return tuple(f"model.layers.{layer}.{path}" for path in _TARGETS[target][1])


def hf_projection_module(layer: int, target: str, projection: str) -> str:
    """The HF module of one projection of a fused Megatron module:
    (0, linear_qkv, q) -> model.layers.0.self_attn.q_proj."""
    leaf = hf_projection_leaf(target, projection)
    return next(name for name in hf_module_names(layer, target) if name.endswith("." + leaf))


_PROJECTION_ADAPTER = re.compile(r"^(?P<module>.+)\.lora_(?P<projection>[a-z]+)$")


def parse_megatron_adapter(name: str) -> tuple[int, str, str | None]:
    """(layer, target, projection) of the module that holds a Megatron adapter: the target
    module itself (projection None), or a canonical projection inside it
    (`decoder.layers.0.self_attention.linear_qkv.lora_q` -> (0, linear_qkv, q))."""
    match = _PROJECTION_ADAPTER.match(name)
    if match is None:
        return (*parse_megatron_module(name), None)
    layer, target = parse_megatron_module(match["module"])
    hf_projection_leaf(target, match["projection"])  # refuses a projection the target lacks
    return layer, target, match["projection"]


def parse_megatron_module(name: str) -> tuple[int, str]:
    """(layer, target) of a Megatron LoRA target module name; wrapper prefixes allowed."""
    match = _MEGATRON_MODULE.match(name)
    if not match:
        raise ValueError(f"{name!r} is not a Megatron decoder LoRA target (expected "
                         f"decoder.layers.<i>.<{'|'.join(p for p, _ in _TARGETS.values())}>)")
    path = match.group(2)
    return int(match.group(1)), path.rsplit(".", 1)[1]


def parse_hf_module(name: str) -> tuple[int, str]:
    """(layer, HF leaf) of an HF target module name; PEFT's `base_model.model.` allowed."""
    match = _HF_MODULE.match(name)
    if not match:
        leaves = "|".join(p for _, ps in _TARGETS.values() for p in ps)
        raise ValueError(f"{name!r} is not an HF Llama-family LoRA target (expected "
                         f"model.layers.<i>.<{leaves}>)")
    return int(match.group(1)), match.group(2).rsplit(".", 1)[1]


def hf_target_modules(targets: Iterable[str]) -> list[str]:
    """adapter_config `target_modules` (HF leaf names) for Megatron targets, in HF order. A
    canonical projection target (`linear_q`) is its own HF module (`q_proj`)."""
    leaves = set()
    for target in targets:
        if target in PROJECTION_TARGETS:
            leaves.add(hf_projection_leaf(*PROJECTION_TARGETS[target]))
        else:
            leaves.update(hf_leaves(target))
    ordered = [leaf for target in _TARGETS for leaf in hf_leaves(target) if leaf in leaves]
    return list(dict.fromkeys(ordered))  # MLA's q_proj is also the standard one


def megatron_target(hf_leaf: str, attention: str = "standard") -> str:
    """The Megatron target an HF leaf belongs to: q_proj -> linear_qkv (standard attention),
    -> linear_q_proj (MLA)."""
    table = _HF_LEAF_TARGET[attention]
    if hf_leaf not in table:
        raise ValueError(f"unknown HF LoRA target {hf_leaf!r} for {attention} attention; known: "
                         f"{', '.join(table)}")
    return table[hf_leaf]


def hf_projection_leaf(target: str, projection: str) -> str:
    """The HF leaf of one projection of a fused Megatron module: (linear_qkv, q) -> q_proj."""
    projections = list(PROJECTIONS.get(target, {}).values())
    if projection not in projections:
        raise ValueError(f"{target} has no projection {projection!r}; its projections are "
                         f"{projections or 'none (it is not fused)'}")
    return hf_leaves(target)[projections.index(projection)]


def projection_of_hf_leaf(hf_leaf: str) -> str | None:
    """The projection an HF leaf is inside its fused Megatron module (q_proj -> q), or None for
    an HF module that is a whole Megatron one (o_proj). Standard attention only."""
    target = megatron_target(hf_leaf)
    if target not in PROJECTIONS:
        return None
    return list(PROJECTIONS[target].values())[hf_leaves(target).index(hf_leaf)]


def _require_gated(geometry: Geometry) -> None:
    if not geometry.gated_linear_unit:
        raise ValueError("linear_fc1 of a non-gated MLP has no Llama-family HF counterpart "
                         "(gate_proj/up_proj need gated_linear_unit=True)")


def split_target(target: str, fused: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, ...]:
    """A full Megatron tensor of `target` (weight, bias or LoRA B; rows on dim 0) as the
    tensors of its HF leaves, in `hf_leaves(target)` order."""
    _check_target(target)
    if target == "linear_qkv":
        return split_qkv(fused, geometry.num_attention_heads, geometry.num_query_groups,
                         geometry.kv_channels)
    if target == "linear_fc1":
        _require_gated(geometry)
        return split_fc1(fused)
    return (fused,)


def fuse_target(target: str, parts: Sequence[torch.Tensor], geometry: Geometry) -> torch.Tensor:
    """Inverse of `split_target`."""
    leaves = hf_leaves(target)
    if len(parts) != len(leaves):
        raise ValueError(f"fuse_target {target}: expected {len(leaves)} tensors "
                         f"({', '.join(leaves)}), got {len(parts)}")
    if target == "linear_qkv":
        return fuse_qkv(*parts, geometry.num_attention_heads, geometry.num_query_groups,
                        geometry.kv_channels)
    if target == "linear_fc1":
        _require_gated(geometry)
        return fuse_fc1(*parts)
    return parts[0]
