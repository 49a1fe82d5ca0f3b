"""The PEFT form `--lora-sync adapter` sends SGLang for an MoE or multi-latent-attention model,
and what keeps SGLang 0.5.15.post1 from serving it (what `check_lora_sync_args` adds for such
models; file and line in SGLang's source: patches/README.md).

- Names: an MoE model's experts (and DeepSeek-V3's MLA linears) are named by its HF
  architecture, read from `--hf-checkpoint`'s `config.json` (`architectures`); dense models keep
  the Llama-family names they share whatever the architecture.
- Experts: SGLang loads per-expert adapters (`mlp.experts.{e}.gate_proj`, ...) into its 4-D
  expert buffers, or, started with `--experts-shared-outer-loras`, one `[1, r, H]` gate/up A and
  one `[1, H, r]` down B per layer beside per-expert factors. A `shared_outer` adapter goes in
  the shared form to a server started so, else copied into every expert (the same function);
  a `per_expert` adapter cannot fill a shared-outer server. SGLang wraps an MoE layer's experts
  for LoRA only when its target modules hold both gate_up_proj and down_proj
  (lora_manager.init_lora_modules), and it auto-detects the shared-outer form only from adapters
  given at start-up, which the sync has none of: the server flag decides.
- MLA (DeepSeek-V3 names): SGLang serves q_a_proj and kv_a_proj_with_mqa as one fused slot
  (`fused_qkv_a_proj_with_mqa`, filled only from a q_a_proj adapter: a kv_a_proj_with_mqa
  adapter alone is dropped), q_b_proj, kv_b_proj and o_proj. It has no slot for the
  uncompressed q_proj of an MLA model without q compression: it folds every q_proj into a
  q/k/v slot that needs k_proj and v_proj (LoRAAdapter.normalize_qkv_proj).

    architecture, expand = peft_form(args)   # what gather_peft_adapter is asked for
    problems = serving_problems(args, targets)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from lora_common.targets import matches
from megatron_lora.interop import architectures

DENSE_DEFAULT = "LlamaForCausalLM"


def checkpoint_architecture(args) -> str | None:
    """The architecture `--hf-checkpoint`'s config.json names (None without one)."""
    path = getattr(args, "hf_checkpoint", None)
    config = os.path.join(path, "config.json") if path else None
    if not config or not os.path.isfile(config):
        return None
    with open(config) as f:
        names = json.load(f).get("architectures") or []
    return names[0] if len(names) == 1 else None


def _needs_own_names(args) -> bool:
    return bool(getattr(args, "num_experts", None) or getattr(args, "multi_latent_attention",
                                                               False))


def peft_form(args) -> tuple[str, bool]:
    """(HF architecture that names the adapter, whether the experts' shared factors are copied
    into every expert) for the sync of this run."""
    name = checkpoint_architecture(args)
    if not _needs_own_names(args) and name not in architectures.ARCHITECTURES:
        name = DENSE_DEFAULT  # Llama-family names, whatever the dense architecture is called
    return name, not bool(getattr(args, "sglang_experts_shared_outer_loras", False))


def _selects(targets: Iterable[str], path: str) -> bool:
    return any(matches(t, path) for t in targets)


def serving_problems(args, targets: Iterable[str], layout: str) -> list[str]:
    """What keeps SGLang from serving the adapter of an MoE or MLA model trained on `targets`
    (resolved Megatron target entries) with expert layout `layout`; [] for dense models."""
    if not _needs_own_names(args):
        return []
    targets = tuple(targets)
    problems = []
    name = checkpoint_architecture(args)
    known = architectures.ARCHITECTURES.get(name)
    experts = bool(getattr(args, "num_experts", None)) and (
        _selects(targets, "mlp.experts.linear_fc1") or _selects(targets, "mlp.experts.linear_fc2"))
    shared = bool(getattr(args, "moe_shared_expert_intermediate_size", None)) and (
        _selects(targets, "mlp.shared_experts.linear_fc1")
        or _selects(targets, "mlp.shared_experts.linear_fc2"))
    mla = bool(getattr(args, "multi_latent_attention", False))
    if known is None:
        naming = [a.name for a in architectures.ARCHITECTURES.values()
                  if a.moe or a.attention == "mla"]
        problems.append(f"--hf-checkpoint's architecture is {name or 'not given'}: the adapter "
                        f"sync names MoE experts and MLA linears as {', '.join(naming)} do")
        return problems
    if experts and known.moe is None:
        problems.append(f"{known.name} has no MoE experts to name the expert adapters after")
    if shared and known.shared_experts is None:
        problems.append(f"{known.name} has no shared experts: leave shared_experts out of "
                        f"--lora-target-modules (e.g. experts.linear_fc1 experts.linear_fc2)")
    if experts and layout == "per_expert" and getattr(args, "sglang_experts_shared_outer_loras",
                                                      False):
        problems.append("--sglang-experts-shared-outer-loras holds one gate/up A and one down B "
                        "per layer, but --lora-expert-layout per_expert trains one per expert "
                        "(train with --lora-expert-layout shared_outer, or drop the flag)")
    if mla:
        problems += _mla_problems(targets, known.name)
    if experts and not getattr(args, "debug_train_only", False):
        served = set(getattr(args, "sglang_lora_target_modules", None) or ())
        if "all" not in served and not ({"gate_proj", "up_proj", "gate_up_proj"} & served
                                        and "down_proj" in served):
            problems.append(f"--sglang-lora-target-modules {sorted(served) or None}: SGLang "
                            f"adapts an MoE layer's experts only when both gate_up_proj "
                            f"(gate_proj up_proj) and down_proj are targets")
    return problems


def _mla_problems(targets: tuple[str, ...], name: str) -> list[str]:
    problems = []
    if name != "DeepseekV3ForCausalLM":
        problems.append(f"multi-latent attention under {name}: the adapter sync names MLA "
                        f"linears as DeepseekV3ForCausalLM does")
    if "linear_q_proj" in targets:
        problems.append("linear_q_proj (MLA without q compression, HF q_proj): SGLang 0.5.15 "
                        "folds every q_proj adapter into a q/k/v slot that needs k_proj and "
                        "v_proj adapters, which MLA has not; leave linear_q_proj out")
    if "linear_kv_down_proj" in targets and "linear_q_down_proj" not in targets:
        problems.append("linear_kv_down_proj without linear_q_down_proj: SGLang 0.5.15 fills its "
                        "fused q_a / kv_a slot from a q_a_proj adapter only, and drops a "
                        "kv_a_proj_with_mqa adapter alone; target both")
    return problems
