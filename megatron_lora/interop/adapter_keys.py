"""The names of adapter tensors in an adapter checkpoint, parsed (no model, no Megatron).

    decoder.layers.{l}.self_attention.linear_qkv.lora_A.weight      attention
    decoder.layers.{l}.self_attention.linear_q_down_proj.lora_A.weight   MLA attention
    decoder.layers.{l}.self_attention.linear_qkv.lora_q.lora_A.weight    canonical: projection q
    decoder.layers.{l}.mlp.linear_fc1.lora_A.weight                  dense MLP
    decoder.layers.{l}.mlp.shared_experts.linear_fc1.lora_A.weight   MoE shared experts
    decoder.layers.{l}.mlp.experts.linear_fc1.lora_A.weight{e}       routed expert e (global)
    decoder.layers.{l}.mlp.experts.linear_fc1.lora_A.weight          shared by the layer's
                                                                     experts (shared_outer)

The same names whatever the TP, PP, EP or ETP split, and for SequentialMLP and grouped experts
alike (`megatron_lora.modules.lora_tensors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_common.targets import MLA_TARGET_MODULES, PROJECTIONS

ATTENTION, DENSE, EXPERTS, SHARED_EXPERTS = "attention", "dense", "experts", "shared_experts"
_PREFIX = r"^(?:module\.)*decoder\.layers\.(?P<layer>\d+)\."
_ATTENTION_TARGETS = ("linear_qkv", "linear_proj", *MLA_TARGET_MODULES)
_KEY = re.compile(
    _PREFIX + r"(?:self_attention\.(?P<attn>" + "|".join(_ATTENTION_TARGETS) + r")|"
    r"mlp\.(?:(?P<moe>experts|shared_experts)\.)?(?P<mlp>linear_fc1|linear_fc2))"
    r"(?:\.lora_(?P<projection>q|k|v|gate|up))?"
    r"\.lora_(?P<matrix>[AB])\.weight(?P<expert>\d*)$")


@dataclass(frozen=True)
class AdapterKey:
    """One adapter tensor's place: layer, where in it (`kind`), target, A or B, and for routed
    experts the global expert index (None: the module's one adapter, or shared by the
    experts); for canonical LoRA the projection inside the fused target (`q`, `gate`, ...)."""

    layer: int
    kind: str     # ATTENTION, DENSE, EXPERTS or SHARED_EXPERTS
    target: str   # linear_qkv, linear_proj, linear_fc1, linear_fc2
    matrix: str   # "A" or "B"
    expert: int | None = None
    projection: str | None = None

    @property
    def module(self) -> str:
        """The Megatron module path (routed experts: the experts' linear, no index)."""
        where = {ATTENTION: "self_attention", DENSE: "mlp", EXPERTS: "mlp.experts",
                 SHARED_EXPERTS: "mlp.shared_experts"}[self.kind]
        return f"decoder.layers.{self.layer}.{where}.{self.target}"

    @property
    def name(self) -> str:
        suffix = "" if self.expert is None else str(self.expert)
        inside = "" if self.projection is None else f".lora_{self.projection}"
        return f"{self.module}{inside}.lora_{self.matrix}.weight{suffix}"


def parse_adapter_key(key: str) -> AdapterKey:
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not a Megatron LoRA adapter tensor (expected "
                         f"decoder.layers.<i>.<self_attention.linear_qkv|self_attention."
                         f"linear_proj|mlp[.experts|.shared_experts].linear_fc1|...>"
                         f".lora_<A|B>.weight[<expert>])")
    if match["attn"]:
        kind, target = ATTENTION, match["attn"]
    else:
        kind, target = match["moe"] or DENSE, match["mlp"]
    if match["expert"] and kind != EXPERTS:
        raise ValueError(f"{key!r}: only routed experts number their adapters")
    expert = int(match["expert"]) if match["expert"] else None
    projection = match["projection"]
    if projection is not None and (kind not in (ATTENTION, DENSE)
                                   or projection not in PROJECTIONS.get(target, {}).values()):
        raise ValueError(f"{key!r}: {target} of the {kind} has no projection {projection!r} "
                         f"(canonical adapters: linear_qkv's q, k, v; a dense linear_fc1's "
                         f"gate, up)")
    return AdapterKey(int(match["layer"]), kind, target, match["matrix"], expert, projection)
