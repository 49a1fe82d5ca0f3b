"""Command-line flags for LoRA, readable by `LoRAConfig.from_args`.

Megatron's parser is extended through `extra_args_provider=add_lora_arguments`; slime users can
also set the same names (`lora_r: 8`) in a YAML file passed to `--custom-config-path`.
Megatron itself owns `--q-lora-rank` / `--kv-lora-rank` (MLA); nothing here starts with `--q-`
or `--kv-`, so there is no clash.

A parser may already define some of these flags: slime's own LoRA (its open PR #1865) adds
`--lora-rank`, `--lora-alpha`, `--lora-dropout` and `--lora-target-modules`. A flag that means
the same (a plain store of the same kind of value: one int, one number, a list of names, an
on/off switch) is reused: the parser's definition and default stay, and our other spellings of
it (`--lora-r` for `--lora-rank`) store into the same place, so both readers see one value.
A flag defined with another meaning is refused by name before any flag is added.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lora_common.config import A_INITS, EXPERT_LAYOUTS, LoRAConfig

_DEFAULT = LoRAConfig()

# Where the flags' values live when a parser's own definitions were reused under another
# `dest` (`{"lora_r": "lora_rank"}`): set as a parser default, read by `LoRAConfig.from_args`.
DESTS_KEY = "lora_flag_dests"


@dataclasses.dataclass(frozen=True)
class _Flag:
    names: tuple[str, ...]
    options: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.options.get("dest") or self.names[0].lstrip("-").replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.options.get("action") is argparse.BooleanOptionalAction

    def option_strings(self) -> list[str]:
        """Every string the flag answers to (a switch's `--no-` forms included)."""
        if not self.switch:
            return list(self.names)
        return [s for name in self.names for s in (name, "--no-" + name[2:])]


def _flags() -> list[_Flag]:
    on_off = argparse.BooleanOptionalAction

    def flag(*names, **options):
        return _Flag(names, options)

    return [
        flag("--use-lora", action=on_off, default=False,
             help="Build the model with LoRA adapters."),
        flag("--lora-r", "--lora-rank", dest="lora_r", type=int, default=_DEFAULT.r,
             help="Adapter rank r."),
        flag("--lora-alpha", type=float, default=_DEFAULT.alpha,
             help="Scaling numerator: the update is (alpha / r) * B @ A."),
        flag("--lora-dropout", type=float, default=_DEFAULT.dropout,
             help="Dropout on the adapter input."),
        flag("--lora-target-modules", nargs="+", default=None, metavar="NAME",
             help="Linear submodules to adapt, by name or dotted path suffix "
                  "(experts.linear_fc1, shared_experts.linear_fc2; default: linear_qkv "
                  "linear_proj linear_fc1 linear_fc2 on Megatron, the Llama projections on "
                  "FSDP)."),
        flag("--lora-exclude-modules", nargs="+", default=[], metavar="NAME",
             help="Module names (or dotted paths) never adapted."),
        flag("--lora-only-trainable", action=on_off, default=_DEFAULT.only_trainable,
             help="Freeze every non-LoRA parameter."),
        flag("--lora-rslora", action=on_off, default=_DEFAULT.use_rslora,
             help="Rank-stabilized scaling alpha / sqrt(r)."),
        flag("--lora-canonical", action=on_off, default=_DEFAULT.canonical,
             help="One adapter per projection inside the fused linear_qkv (q, k, v) and "
                  "linear_fc1 (gate, up), as PEFT adapts them; targets may then name linear_q "
                  "linear_k linear_v linear_fc1_gate linear_fc1_up."),
        flag("--lora-init", choices=A_INITS, default=_DEFAULT.init,
             help="Initialization of A (B always starts at zero)."),
        flag("--lora-expert-layout", choices=EXPERT_LAYOUTS, default=_DEFAULT.expert_layout,
             help="Adapters of MoE routed experts: per_expert (each expert its own A and B) or "
                  "shared_outer (fc1's A and fc2's B shared by a layer's experts, SGLang's "
                  "layout; needs grouped-GEMM experts)."),
        flag("--lora-seed", type=int, default=None,
             help="Seed of the adapter init (default: Megatron's --seed, else 0)."),
        flag("--lora-sync", choices=("merged", "adapter"), default="merged",
             help="What each weight sync sends a rollout engine: the merged model (W + s B A, "
                  "any engine), or the base once and then only the adapter (SGLang started "
                  "with LoRA enabled; see the README)."),
        flag("--lora-base-spec", nargs=2, default=None, metavar=("MODULE", "FUNCTION"),
             help="Base layer spec that get_gpt_lora_spec wraps, called like --spec."),
    ]


def _is_list(nargs) -> bool:
    return nargs in ("+", "*", argparse.REMAINDER) or (isinstance(nargs, int) and nargs > 1)


def _describe(action: argparse.Action) -> str:
    kind = type(action).__name__.lstrip("_")
    value = getattr(action.type, "__name__", action.type)
    return f"{kind}, type {value}, nargs {action.nargs}, dest {action.dest!r}"


def _same_meaning(flag: _Flag, action: argparse.Action) -> bool:
    """Whether the parser's `action` stores what `flag` stores: the same kind of action, one
    value or a list alike, and a value our config reads (an int rank, a number, names)."""
    if flag.switch:
        return isinstance(action, argparse.BooleanOptionalAction)
    if type(action) is not argparse._StoreAction:
        return False
    if _is_list(action.nargs) != _is_list(flag.options.get("nargs")):
        return False
    if flag.options.get("nargs") == 2 and action.nargs != 2:
        return False
    ours = flag.options.get("type")
    accepted = {int: (int,), float: (int, float), None: (None, str)}[ours]
    return action.type in accepted


def _plan(parser: argparse.ArgumentParser, flag: _Flag) -> tuple[list[str], str | None]:
    """The option strings of `flag` still to add and the dest they store into (None: the flag's
    own); refuses, naming the flag, a parser definition with another meaning."""
    taken = {s: parser._option_string_actions[s] for s in flag.option_strings()
             if s in parser._option_string_actions}
    if not taken:
        return flag.option_strings(), None
    actions = {id(action): action for action in taken.values()}.values()
    for string, action in taken.items():
        if not _same_meaning(flag, action):
            raise ValueError(
                f"{string}: the parser already defines it ({_describe(action)}), which is not "
                f"what megatron-lora's {'/'.join(flag.names)} means "
                f"({'on/off switch' if flag.switch else _describe_ours(flag)}); remove one of "
                f"the two definitions")
    if len(actions) > 1:
        described = "; ".join(map(_describe, actions))
        raise ValueError(f"{'/'.join(flag.names)}: the parser already defines {sorted(taken)} "
                         f"as different flags ({described}); megatron-lora's spellings name one "
                         f"value")
    (action,) = actions
    return [s for s in flag.option_strings() if s not in taken], action.dest


def _describe_ours(flag: _Flag) -> str:
    value = getattr(flag.options.get("type"), "__name__", "str")
    return f"type {value}, nargs {flag.options.get('nargs')}"


def add_lora_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--lora-*` flags to `parser` (in their own group) and return it.

    Every boolean has a working `--no-` form: `--lora-only-trainable` defaults to True, so
    `--no-lora-only-trainable` is the only way to train the base too. Flags the parser already
    defines with the same meaning are reused (see the module docstring); one defined with
    another meaning raises `ValueError` naming it, and then nothing is added.
    """
    plans = [(flag, *_plan(parser, flag)) for flag in _flags()]  # every refusal first
    group = parser.add_argument_group("LoRA")
    dests = {}
    for flag, free, dest in plans:
        if dest is None:
            group.add_argument(*flag.names, **flag.options)
            continue
        if dest != flag.dest:
            dests[flag.dest] = dest
        if free and not flag.switch:  # our other spellings store into the parser's value
            options = {k: v for k, v in flag.options.items() if k not in ("dest", "default")}
            group.add_argument(*free, dest=dest, default=argparse.SUPPRESS, **options)
    if dests:
        parser.set_defaults(**{DESTS_KEY: dests})
    return parser
