"""`LoRAConfig`: the one description of an adapter, shared by the Megatron and FSDP backends.

No Megatron import here: `fsdp_lora` uses this class with megatron-core absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_common import targets as target_names

# The linears LoRA adapts when the user names none. Megatron fuses q/k/v into `linear_qkv`
# and gate/up into `linear_fc1`; HuggingFace Llama-family models keep them separate. Module-name
# lists are sets: kept sorted, as PEFT writes them.
MEGATRON_TARGET_MODULES = ("linear_fc1", "linear_fc2", "linear_proj", "linear_qkv")
HF_TARGET_MODULES = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")

A_INITS = ("kaiming", "gaussian")

# How the routed experts of an MoE layer hold their adapters (Megatron backend):
#   per_expert     every expert its own A and B on fc1 and on fc2
#   shared_outer   fc1's A and fc2's B shared by the experts of a layer, the rest per expert
#                  (SGLang's --experts-shared-outer-loras layout)
EXPERT_LAYOUTS = ("per_expert", "shared_outer")
# Fields added after adapter headers first carried a config: an old header without them means
# the default (the adapters were made before the field existed).
ADDED_FIELDS = ("expert_layout", "canonical")


def _names(value: str | Iterable[str] | None, field: str) -> tuple[str, ...] | None:
    """Normalize a module-name list to a sorted tuple without duplicates: the same set of
    names is the same config whatever its order. YAML and CLI hand us lists, or one string
    separated by commas or spaces."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    elif not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise ValueError(f"LoRAConfig.{field} must be a module name or a list of names, got "
                         f"{value!r} ({type(value).__name__})")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"LoRAConfig.{field}: every entry must be a non-empty string, "
                             f"got {name!r}")
    return tuple(sorted(set(names)))


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of a LoRA adapter (PEFT's meaning for every field).

    `target_modules=None` means the backend's standard set (`MEGATRON_TARGET_MODULES` or
    `HF_TARGET_MODULES`); `resolve_targets` fills it in. A target is a module name or a dotted
    suffix of a module's path (`linear_fc1` selects every fc1, dense, shared expert and routed
    expert alike; `experts.linear_fc1` only the routed experts'). `expert_layout` is one of
    `EXPERT_LAYOUTS`.

    `canonical` (Megatron): one adapter per projection inside the fused `linear_qkv` (q, k, v)
    and `linear_fc1` (gate, up), PEFT's model, instead of one adapter whose A the projections
    share; targets may then name projections (`linear_q`, `linear_fc1_up`, see
    `lora_common.targets`). `fsdp_lora` adapts HF's separate projections, per projection
    whatever this field says.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    use_rslora: bool = False
    init: str = "kaiming"
    only_trainable: bool = True
    seed: int = 0
    expert_layout: str = "per_expert"
    canonical: bool = False

    def __post_init__(self) -> None:
        # frozen: normalize through object.__setattr__ before validating.
        object.__setattr__(self, "target_modules", _names(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules",
                           _names(self.exclude_modules, "exclude_modules") or ())
        self._validate()
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", target_names.normalize_targets(
                self.target_modules, self.canonical))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one module")
        both = sorted(set(self.target_modules or ()) & set(self.exclude_modules))
        if both:
            raise ValueError(f"LoRAConfig.exclude_modules also names target module(s) {both}")
        if self.init not in A_INITS:
            raise ValueError(f"LoRAConfig.init must be one of {A_INITS}, got {self.init!r}")
        if self.expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"LoRAConfig.expert_layout must be one of {EXPERT_LAYOUTS}, got "
                             f"{self.expert_layout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"LoRAConfig.seed must be an int, got {self.seed!r}")
        for flag in ("use_rslora", "only_trainable", "canonical"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag} must be a bool, got {getattr(self, flag)!r}")
        target_names.check_targets(self.target_modules or (), self.canonical)

    @property
    def scaling(self) -> float:
        """Multiplier of `B @ A`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def resolve_targets(self, default: tuple[str, ...]) -> LoRAConfig:
        """This config with `target_modules` filled in from a backend's default."""
        if self.target_modules is not None:
            return self
        return dataclasses.replace(self, target_modules=default)

    def module_targets(self) -> dict[str, tuple[str, ...]]:
        """`{module name: projections}` of the resolved targets: the linears that get LoRA and,
        in canonical mode, the projections of a fused one that get an adapter each (`()`: one
        adapter for the module). See `lora_common.targets`."""
        if self.target_modules is None:
            raise ValueError("LoRAConfig.module_targets: resolve_targets first")
        return target_names.module_targets(self.target_modules, self.canonical)

    def differences(self, other: LoRAConfig) -> list[str]:
        """`field: self's value -> other's` for every field where `other` differs (for errors
        that name what differs, not only that something does)."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `from_dict` inverts it."""
        out = dataclasses.asdict(self)
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        out["exclude_modules"] = list(self.exclude_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, require_all: bool = False) -> LoRAConfig:
        """The config a `to_dict` mapping (or a user's dict of field names) describes; absent
        fields keep their defaults unless `require_all` (a saved header must name them all, but
        those in `ADDED_FIELDS`, which headers written before them lack)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LoRAConfig: unknown field(s) {unknown}; "
                             f"known fields are {sorted(known)}")
        missing = sorted(known - set(data) - set(ADDED_FIELDS))
        if require_all and missing:
            raise ValueError(f"LoRAConfig: missing field(s) {missing}")
        return cls(**data)

    @classmethod
    def coerce(cls, value: Any, what: str = "LoRA config") -> LoRAConfig:
        """A `LoRAConfig` from what the apply functions accept: a `LoRAConfig`, an argparse
        namespace holding the `--lora-*` flags (`from_args`), or a mapping of field names
        (`from_dict`). Anything else is a `TypeError`: silently reading defaults off an object
        that merely lacks the flag attributes would train another adapter than asked for."""
        if isinstance(value, cls):
            return value
        if isinstance(value, argparse.Namespace):
            return cls.from_args(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"{what}: expected a LoRAConfig, an argparse.Namespace of --lora-* flags "
                        f"or a mapping of LoRAConfig fields, got {type(value).__name__}")

    @classmethod
    def from_args(cls, args: Any) -> LoRAConfig:
        """Read the `--lora-*` flags (see `add_lora_arguments`) from an argparse namespace, or
        the same names set by a YAML file (slime's `--custom-config-path`). Absent names keep
        their defaults. `--lora-seed` falls back to Megatron's `--seed`. Where the parser's own
        definition of a flag was reused under another name (`lora_rank` for our `lora_r`),
        the value is read from there. A value the config refuses (a YAML file's
        `lora_r: "16"`) is a `ValueError` naming its flag."""
        default = cls()
        dests = getattr(args, "lora_flag_dests", None) or {}

        def flag(name, fallback):
            return getattr(args, dests.get(name, name), fallback)

        names = {field: "--" + dests.get(arg, arg).replace("_", "-")
                 for field, arg in _ARGS.items()}
        seed = flag("lora_seed", None)
        if seed is None:
            seed, names["seed"] = getattr(args, "seed", default.seed), "--seed"
        try:
            return cls(
                r=flag("lora_r", default.r),
                alpha=flag("lora_alpha", default.alpha),
                dropout=flag("lora_dropout", default.dropout),
                target_modules=flag("lora_target_modules", default.target_modules),
                exclude_modules=flag("lora_exclude_modules", None) or (),
                use_rslora=flag("lora_rslora", default.use_rslora),
                init=flag("lora_init", default.init),
                only_trainable=flag("lora_only_trainable", default.only_trainable),
                seed=seed,
                expert_layout=flag("lora_expert_layout", default.expert_layout),
                canonical=flag("lora_canonical", default.canonical),
            )
        except ValueError as error:  # every field's message starts `LoRAConfig.<field>`
            field = re.match(r"LoRAConfig\.(\w+)", str(error))
            name = names.get(field.group(1)) if field else None
            raise ValueError(f"{name or '--lora-* flags'}: {error}") from None


# The argument (`add_lora_arguments`) each field is read from, for errors.
_ARGS = {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
         "target_modules": "lora_target_modules", "exclude_modules": "lora_exclude_modules",
         "use_rslora": "lora_rslora", "init": "lora_init", "only_trainable": "lora_only_trainable",
         "seed": "lora_seed", "expert_layout": "lora_expert_layout", "canonical": "lora_canonical"}
