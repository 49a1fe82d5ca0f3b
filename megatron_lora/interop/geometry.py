"""The model geometry an adapter depends on, in Megatron's `TransformerConfig` names.

Small enough to travel in an adapter checkpoint's header, so an export can split fused
adapters with no model at hand, and a load can refuse an adapter made for another model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_lora.interop.architectures import architecture

# Fields that may be None (a dense model) and that headers written before them lack.
OPTIONAL_FIELDS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


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
    # MoE (None for a dense model; headers written before MoE support lack them):
    num_moe_experts: int | None = None                    # routed experts per MoE layer
    moe_ffn_hidden_size: int | None = None                # each routed expert's ffn width
    moe_shared_expert_intermediate_size: int | None = None  # the shared experts' ffn width

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise ValueError(f"Geometry.{field.name} must be a bool, got {value!r}")
            elif value is None and field.name in OPTIONAL_FIELDS:
                continue
            elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Geometry.{field.name} must be a positive int, got {value!r}")
        if (self.num_moe_experts is None) != (self.moe_ffn_hidden_size is None):
            raise ValueError(f"Geometry: num_moe_experts ({self.num_moe_experts}) and "
                             f"moe_ffn_hidden_size ({self.moe_ffn_hidden_size}) go together")
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

    def ffn_size(self, kind: str) -> int:
        """The ffn width of an MLP of `kind`: "dense", "experts" or "shared_experts"."""
        size = {"dense": self.ffn_hidden_size, "experts": self.moe_ffn_hidden_size,
                "shared_experts": self.moe_shared_expert_intermediate_size}[kind]
        if size is None:
            raise ValueError(f"Geometry: the model has no MoE {kind.replace('_', ' ')}")
        return size

    def features(self, target: str, kind: str = "dense", attention: str = "standard"
                 ) -> tuple[int | None, int | None]:
        """(input, output) width of the full weight of a Megatron target linear of an MLP of
        `kind` ("dense", "experts", "shared_experts") or of the attention; None where the
        geometry does not say: MLA's linears, and MLA's `linear_proj` input (heads x
        v_head_dim)."""
        if target in ("linear_fc1", "linear_fc2"):
            ffn = self.ffn_size("dense" if kind == "attention" else kind)
            if target == "linear_fc2":
                return ffn, self.hidden_size
            return self.hidden_size, ffn * (2 if self.gated_linear_unit else 1)
        if target == "linear_qkv":
            return self.hidden_size, self.qkv_rows
        if target == "linear_proj":
            heads = self.num_attention_heads * self.kv_channels
            return (None if attention == "mla" else heads), self.hidden_size
        return None, None

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
            num_moe_experts=getattr(config, "num_moe_experts", None) or None,
            moe_ffn_hidden_size=(config.moe_ffn_hidden_size
                                 if getattr(config, "num_moe_experts", None) else None),
            moe_shared_expert_intermediate_size=getattr(
                config, "moe_shared_expert_intermediate_size", None) or None,
        )

    @classmethod
    def from_hf(cls, config: Any) -> Geometry:
        """From an HF config of a known architecture (all of them use SwiGLU)."""
        arch = architecture(config)
        mla, moe = arch.attention == "mla", arch.moe
        if moe and getattr(config, "first_k_dense_replace", 0) >= config.num_hidden_layers:
            moe = None  # DeepSeek-V3 with every layer dense
        heads = config.num_attention_heads
        experts = getattr(config, moe.num_experts_field) if moe else None
        shared = getattr(config, "n_shared_experts", None) if arch.shared_experts and moe else None
        # HF's own rule: an absent or None head_dim means hidden_size / heads. MLA's head
        # widths are its own fields (DeepSeek-V3's `head_dim` is the rope width); Megatron's
        # MLA config keeps kv_channels at its default, hidden_size / heads.
        head_dim = None if mla else getattr(config, "head_dim", None)
        return cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            kv_channels=head_dim or config.hidden_size // heads,
            ffn_hidden_size=config.intermediate_size, gated_linear_unit=True,
            num_moe_experts=experts,
            moe_ffn_hidden_size=getattr(config, moe.ffn_field) if moe else None,
            moe_shared_expert_intermediate_size=(shared * getattr(config, moe.ffn_field)
                                                 if shared else None),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Geometry:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data) - {"gated_linear_unit"} - set(OPTIONAL_FIELDS))
        if unknown or missing:
            raise ValueError(f"Geometry.from_dict: unknown field(s) {unknown}, missing field(s) "
                             f"{missing}; fields are {sorted(known)}")
        return cls(**data)

    def require_equal(self, other: Geometry, what: str) -> None:
        """Raise naming every field where `other` (described by `what`) differs from self."""
        diffs = [f"{f.name}: {getattr(self, f.name)} vs {getattr(other, f.name)} in {what}"
                 for f in dataclasses.fields(self)
                 if getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            raise ValueError("geometry mismatch: " + "; ".join(diffs))
