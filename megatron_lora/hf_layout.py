"""Megatron GPT <-> HuggingFace Llama-family names and tensor layouts, written once.

Used by the PEFT export and import and by the tests that convert an HF model into a Megatron
`GPTModel`. No transformers or Megatron import: the functions take names, plain tensors and
duck-typed configs, so an exporter can run offline from a geometry header.

Three things differ between the two worlds:

- names: `decoder.layers.{i}.self_attention.linear_qkv` vs `model.layers.{i}.self_attn.q_proj`...
- fusion: Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`; HF keeps them
  apart. Megatron's fused q/k/v rows are interleaved per query group,
  `[q heads of group 0; k_0; v_0; q heads of group 1; k_1; v_1; ...]` (this is what lets a
  column-parallel split hand every rank whole groups); the full `linear_fc1` is `[gate; up]`.
- per-architecture extras: Qwen2 has q/k/v biases, Qwen3 normalizes each head's q and k.

All layout functions act on full (unsharded) tensors along dim 0, so the same call handles a
weight `[out, in]`, a bias `[out]` and a LoRA B `[out, r]`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch


# --- architectures -------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """An HF Llama-family causal LM class and what its layers carry beyond Llama's."""

    name: str        # HF class name, as in `config.architectures`
    model_type: str  # HF `config.model_type`
    qkv_bias: bool   # q/k/v projections have biases (o_proj and the MLP do not)
    qk_norm: bool    # RMSNorm over each head's q and k, before RoPE


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (
        Architecture("LlamaForCausalLM", "llama", qkv_bias=False, qk_norm=False),
        Architecture("MistralForCausalLM", "mistral", qkv_bias=False, qk_norm=False),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, qk_norm=False),
        Architecture("Qwen3ForCausalLM", "qwen3", qkv_bias=False, qk_norm=True),
    )
}


def architecture(name_or_config: str | Any) -> Architecture:
    """The known architecture named by a class name, or that of an HF config (its
    `architectures` list, else its `model_type`: configs built in code have no list)."""
    if isinstance(name_or_config, str):
        name = name_or_config
    else:
        names = getattr(name_or_config, "architectures", None) or []
        if len(names) > 1:
            raise ValueError(f"HF config lists several architectures {names}; expected one")
        if names:
            name = names[0]
        else:
            by_type = {a.model_type: a.name for a in ARCHITECTURES.values()}
            model_type = getattr(name_or_config, "model_type", None)
            name = by_type.get(model_type, f"model_type {model_type!r}")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name}; megatron_lora.hf_layout knows "
                         f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


# --- geometry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The shape facts that splitting and fusing need, in Megatron's `TransformerConfig` names.

    Small enough to travel in an adapter checkpoint's header, so an export can split fused
    adapters with no model at hand.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int  # per-head width; Qwen3 sets it apart from hidden_size / heads
    ffn_hidden_size: int
    gated_linear_unit: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"Geometry.{field.name} must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Geometry.{field.name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"Geometry: num_attention_heads {self.num_attention_heads} is not a "
                             f"multiple of num_query_groups {self.num_query_groups}")

    @property
    def qkv_rows(self) -> int:
        """Output width of the fused `linear_qkv`."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    @property
    def fc1_rows(self) -> int:
        """Output width of `linear_fc1` (`[gate; up]` when gated)."""
        return self.ffn_hidden_size * (2 if self.gated_linear_unit else 1)

    @classmethod
    def from_megatron(cls, config: Any) -> Geometry:
        """From a Megatron `TransformerConfig` (None groups / kv_channels take Megatron's
        defaults, as its `__post_init__` would)."""
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            num_attention_heads=heads, num_query_groups=config.num_query_groups or heads,
            kv_channels=config.kv_channels or config.hidden_size // heads,
            ffn_hidden_size=config.ffn_hidden_size,
            gated_linear_unit=bool(config.gated_linear_unit),
        )

    @classmethod
    def from_hf(cls, config: Any) -> Geometry:
        """From an HF config of a known architecture (all of them use SwiGLU)."""
        architecture(config)
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            # HF's own rule: an absent or None head_dim means hidden_size / heads.
            kv_channels=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn_hidden_size=config.intermediate_size, gated_linear_unit=True,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data) - {"gated_linear_unit"})
        if unknown or missing:
            raise ValueError(f"Geometry.from_dict: unknown field(s) {unknown}, missing field(s) "
                             f"{missing}; fields are {sorted(known)}")
        return cls(**data)

    def require_equal(self, other: Geometry, what: str) -> None:
        """Raise naming every field where `other` (described by `what`) differs from self."""
        diffs = [f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)} in {what}"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise ValueError("geometry mismatch: " + "; ".join(diffs))


# --- layouts -------------------------------------------------------------------------------


def _rows(tensor: torch.Tensor, expected: int, what: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] != expected:
        raise ValueError(f"{what}: expected {expected} rows (dim 0), got shape {tuple(tensor.shape)}")


def split_qkv(fused: torch.Tensor, num_heads: int, num_query_groups: int, kv_channels: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's q, k, v (rows in head order) from Megatron's fused `linear_qkv` rows
    `[q heads of group g; k_g; v_g]` for each group g. Works for MHA (groups == heads)."""
    if num_heads % num_query_groups:
        raise ValueError(f"split_qkv: {num_heads} heads do not divide into {num_query_groups} groups")
    per_group = num_heads // num_query_groups
    _rows(fused, (num_heads + 2 * num_query_groups) * kv_channels, "split_qkv fused tensor")
    rest = fused.shape[1:]
    grouped = fused.reshape(num_query_groups, (per_group + 2) * kv_channels, *rest)
    q, k, v = grouped.split([per_group * kv_channels, kv_channels, kv_channels], dim=1)
    return tuple(part.reshape(-1, *rest) for part in (q, k, v))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_query_groups: int, kv_channels: int) -> torch.Tensor:
    """Inverse of `split_qkv`: Megatron's per-group interleaved `linear_qkv` rows."""
    if num_heads % num_query_groups:
        raise ValueError(f"fuse_qkv: {num_heads} heads do not divide into {num_query_groups} groups")
    _rows(q, num_heads * kv_channels, "fuse_qkv q")
    _rows(k, num_query_groups * kv_channels, "fuse_qkv k")
    _rows(v, num_query_groups * kv_channels, "fuse_qkv v")
    if not q.shape[1:] == k.shape[1:] == v.shape[1:]:
        raise ValueError(f"fuse_qkv: q, k, v differ beyond dim 0: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rest = q.shape[1:]
    grouped = [t.reshape(num_query_groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_fc1(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's gate and up from the full Megatron SwiGLU `linear_fc1` `[gate; up]`."""
    if fused.dim() == 0 or fused.shape[0] % 2:
        raise ValueError(f"split_fc1: fused fc1 needs an even number of rows, got shape "
                         f"{tuple(fused.shape)}")
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_fc1`."""
    if gate.shape != up.shape:
        raise ValueError(f"fuse_fc1: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0)


# --- LoRA target modules -------------------------------------------------------------------

# Megatron target -> (its path inside a decoder layer, the HF paths inside an HF layer).
_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "linear_qkv": ("self_attention.linear_qkv",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "linear_proj": ("self_attention.linear_proj", ("self_attn.o_proj",)),
    "linear_fc1": ("mlp.linear_fc1", ("mlp.gate_proj", "mlp.up_proj")),
    "linear_fc2": ("mlp.linear_fc2", ("mlp.down_proj",)),
}
# HF leaf -> the Megatron target that holds it.
_HF_LEAF_TARGET = {path.rsplit(".", 1)[1]: target
                   for target, (_, paths) in _TARGETS.items() for path in paths}

# Wrappers put these in front of Megatron names (DDP, Float16Module) and of HF names
# (PEFT's `base_model.model.`).
_MEGATRON_PREFIX = r"^(?:module\.)*"
_HF_PREFIX = r"^(?:base_model\.model\.)?"
_MEGATRON_MODULE = re.compile(
    _MEGATRON_PREFIX + r"decoder\.layers\.(\d+)\.("
    + "|".join(re.escape(path) for path, _ in _TARGETS.values()) + r")$")
_HF_MODULE = re.compile(
    _HF_PREFIX + r"model\.layers\.(\d+)\.("
    + "|".join(re.escape(p) for _, paths in _TARGETS.values() for p in paths) + r")$")


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
    """The HF modules (as named inside `*ForCausalLM`) one Megatron target becomes."""
    _check_target(target)
    return tuple(f"model.layers.{layer}.{path}" for path in _TARGETS[target][1])


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
        raise ValueError(f"{name!r} is not an HF Llama-family LoRA target (expected "
                         f"model.layers.<i>.<{'|'.join(p for _, ps in _TARGETS.values() for p in ps)}>)")
    return int(match.group(1)), match.group(2).rsplit(".", 1)[1]


def hf_target_modules(targets: Iterable[str]) -> list[str]:
    """adapter_config `target_modules` (HF leaf names) for Megatron targets, in HF order."""
    wanted = set(targets)
    for target in wanted:
        _check_target(target)
    return [leaf for target in _TARGETS if target in wanted for leaf in hf_leaves(target)]


def megatron_target(hf_leaf: str) -> str:
    """The Megatron target an HF leaf belongs to: q_proj -> linear_qkv."""
    if hf_leaf not in _HF_LEAF_TARGET:
        raise ValueError(f"unknown HF LoRA target {hf_leaf!r}; known: {', '.join(_HF_LEAF_TARGET)}")
    return _HF_LEAF_TARGET[hf_leaf]


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


# --- whole-model parameter names -----------------------------------------------------------


@dataclass(frozen=True)
class ParamMapping:
    """Where a Megatron parameter's full value comes from in an HF state dict: one HF tensor
    copied, or several fused by `fuse_target(target, ...)`."""

    hf_names: tuple[str, ...]
    target: str | None = None  # the LoRA target whose layout fuses `hf_names`; None: a copy


_LAYER_NORMS = {
    # local spec (separate norm modules) and TE spec (norm fused into the next linear)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER_PARAM = re.compile(_MEGATRON_PREFIX + r"decoder\.layers\.(\d+)\.(.+)$")


def hf_param(megatron_name: str) -> ParamMapping:
    """The HF source of a Megatron GPT base parameter (local or TE spec names; not LoRA's)."""
    name = re.sub(_MEGATRON_PREFIX, "", megatron_name)
    if name in _GLOBAL:
        return ParamMapping((_GLOBAL[name],))
    match = _LAYER_PARAM.match(name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if rest in _LAYER_NORMS:
            return ParamMapping((f"model.layers.{layer}.{_LAYER_NORMS[rest]}",))
        module, _, kind = rest.rpartition(".")
        for target, (path, _) in _TARGETS.items():
            if module == path and kind in ("weight", "bias"):
                names = tuple(f"{n}.{kind}" for n in hf_module_names(layer, target))
                return ParamMapping(names, target if len(names) > 1 else None)
    raise ValueError(f"no HF Llama-family counterpart for Megatron parameter {megatron_name!r}")
