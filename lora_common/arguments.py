"""Command-line flags for LoRA, readable by `LoRAConfig.from_args`.

Megatron's parser is extended through `extra_args_provider=add_lora_arguments`; slime users can
also set the same names (`lora_r: 8`) in a YAML file passed to `--custom-config-path`.
Megatron itself owns `--q-lora-rank` / `--kv-lora-rank` (MLA); nothing here starts with `--q-`
or `--kv-`, so there is no clash.
"""

from __future__ import annotations

import argparse

from lora_common.config import A_INITS, EXPERT_LAYOUTS, LoRAConfig

_DEFAULT = LoRAConfig()


def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--lora-*` flags to `parser` (in their own group) and return it.

    Every boolean has a working `--no-` form: `--lora-only-trainable` defaults to True, so
    `--no-lora-only-trainable` is the only way to train the base too.
    """
    group = parser.add_argument_group("LoRA")
    on_off = argparse.BooleanOptionalAction
    group.add_argument("--use-lora", action=on_off, default=False,
                       help="Build the model with LoRA adapters.")
    group.add_argument("--lora-r", "--lora-rank", dest="lora_r", type=int, default=_DEFAULT.r,
                       help="Adapter rank r.")
    group.add_argument("--lora-alpha", type=float, default=_DEFAULT.alpha,
                       help="Scaling numerator: the update is (alpha / r) * B @ A.")
    group.add_argument("--lora-dropout", type=float, default=_DEFAULT.dropout,
                       help="Dropout on the adapter input.")
    group.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                       help="Linear submodules to adapt, by name or dotted path suffix "
                            "(experts.linear_fc1, shared_experts.linear_fc2; default: linear_qkv "
                            "linear_proj linear_fc1 linear_fc2 on Megatron, the Llama "
                            "projections on FSDP).")
    group.add_argument("--lora-exclude-modules", nargs="+", default=[], metavar="NAME",
                       help="Module names (or dotted paths) never adapted.")
    group.add_argument("--lora-only-trainable", action=on_off, default=_DEFAULT.only_trainable,
                       help="Freeze every non-LoRA parameter.")
    group.add_argument("--lora-rslora", action=on_off, default=_DEFAULT.use_rslora,
                       help="Rank-stabilized scaling alpha / sqrt(r).")
    group.add_argument("--lora-canonical", action=on_off, default=_DEFAULT.canonical,
                       help="One adapter per projection inside the fused linear_qkv (q, k, v) "
                            "and linear_fc1 (gate, up), as PEFT adapts them; targets may then "
                            "name linear_q linear_k linear_v linear_fc1_gate linear_fc1_up.")
    group.add_argument("--lora-init", choices=A_INITS, default=_DEFAULT.init,
                       help="Initialization of A (B always starts at zero).")
    group.add_argument("--lora-expert-layout", choices=EXPERT_LAYOUTS,
                       default=_DEFAULT.expert_layout,
                       help="Adapters of MoE routed experts: per_expert (each expert its own A "
                            "and B) or shared_outer (fc1's A and fc2's B shared by a layer's "
                            "experts, SGLang's layout; needs grouped-GEMM experts).")
    group.add_argument("--lora-seed", type=int, default=None,
                       help="Seed of the adapter init (default: Megatron's --seed, else 0).")
    group.add_argument("--lora-sync", choices=("merged", "adapter"), default="merged",
                       help="What each weight sync sends a rollout engine: the merged model "
                            "(W + s B A, any engine), or the base once and then only the "
                            "adapter (SGLang started with LoRA enabled; see the README).")
    group.add_argument("--lora-base-spec", nargs=2, default=None, metavar=("MODULE", "FUNCTION"),
                       help="Base layer spec that get_gpt_lora_spec wraps, called like --spec.")
    return parser
