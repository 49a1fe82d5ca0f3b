"""The LoRA state protocol both backends share: what state a LoRA module is in, which
parameters are adapters, and the one check every model-level verb makes before it acts.

A LoRA module (a Megatron parallel linear or an `nn.Linear`, subclassed) is

    active     the adapter branch runs:  y = W x + s B A x
    merged     W holds W + s B A and the branch is skipped: the same function, one GEMM
    disabled   inside `disable_lora`: the branch is skipped, W is the base (a depth counter,
               so contexts nest)

Merged and disabled exclude each other: a merged W is not the base, so it cannot be disabled,
and merging inside `disable_lora` would break that context's promise. Verbs that read or write
W or the adapters (load, save, merge, the merged stream) state which states they accept through
`require_state`, which names the first module that does not fit before anything changes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping

import torch

# Adapter parameters are `<module>.lora_A.weight` and `<module>.lora_B.weight` (PEFT's names):
# the one rule by which both backends, their checkpoints and weight sync tell adapters apart
# (and, as a regex string, slime's `--only-train-params-name-list`). A grouped expert linear
# (Transformer Engine's GroupedLinear) numbers its weights `weight0`, `weight1`, ...; its
# per-expert adapters follow: `<module>.lora_A.weight3`.
ADAPTER_PARAMETER_PATTERN = r"(?:^|\.)lora_([AB])\.weight(\d*)$"
_ADAPTER_PARAMETER = re.compile(ADAPTER_PARAMETER_PATTERN)


def is_lora_parameter(name: str) -> bool:
    """Whether `name` is an adapter matrix: `...lora_A.weight`, `...lora_B.weight` or, per
    expert of a grouped linear, `...lora_A.weight<i>`."""
    return _ADAPTER_PARAMETER.search(name) is not None


def parse_adapter_name(name: str) -> tuple[str, str, str] | None:
    """`a.b.lora_A.weight3` -> (`a.b.`, `A`, `3`): the module's prefix (`` at the top), the
    matrix and the expert number (`` for a module's one adapter); None if not an adapter."""
    match = _ADAPTER_PARAMETER.search(name)
    if match is None:
        return None
    prefix = name[:match.start()] + ("." if match.group(0).startswith(".") else "")
    return prefix, match.group(1), match.group(2)


def adapter_prefix(name: str) -> str | None:
    """`a.b.lora_A.weight` -> `a.b.` (the module's prefix, `` at the top); None if not an
    adapter."""
    parsed = parse_adapter_name(name)
    return None if parsed is None else parsed[0]


class LoRAState:
    """The state every LoRA module carries (a mixin of the LoRA subclass)."""

    lora_merged: bool = False  # W holds the adapter's delta
    lora_disabled: int = 0     # depth of enclosing `disable_lora` contexts
    lora_scaling: float        # alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def lora_active(self) -> bool:
        """The adapter branch runs in the forward."""
        return not self.lora_merged and not self.lora_disabled


# What each unmet demand of `require_state` says about the modules that fail it.
_PROBLEM = {("lora_merged", False): "are merged (unmerge_lora_weights first)",
            ("lora_merged", True): "are not merged",
            ("lora_disabled", False): "are disabled (the call is inside disable_lora)",
            ("lora_disabled", True): "are not disabled"}


def require_state(modules: Mapping[str, LoRAState], verb: str, *, merged: bool | None = None,
                  disabled: bool | None = None, model: object = None) -> None:
    """Raise unless the model has LoRA modules and each is in a state `verb` accepts.

    `modules` maps names to modules (the names appear in errors); `merged` / `disabled` set to
    True or False demand that state of every module, None accepts either. `model` names the
    model in the no-adapter error. No modules: `ValueError`; a module in the wrong state:
    `RuntimeError` naming it."""
    if not modules:
        what = type(model).__name__ if model is not None else "the model"
        raise ValueError(f"{verb}: {what} has no LoRA modules")
    for attribute, wanted in (("lora_merged", merged), ("lora_disabled", disabled)):
        if wanted is None:
            continue
        wrong = [name for name, module in modules.items()
                 if bool(getattr(module, attribute)) != wanted]
        if wrong:
            raise RuntimeError(f"{verb}: {len(wrong)} LoRA module(s) "
                               f"{_PROBLEM[attribute, wanted]}, e.g. {wrong[0]!r}")


@contextlib.contextmanager
def lora_disabled(modules: Mapping[str, LoRAState], model: object = None) -> Iterator[None]:
    """The body of both backends' `disable_lora`: every module's branch off inside the block.
    Nests (a depth counter) and restores on exceptions; refused on a merged model."""
    require_state(modules, "disable_lora", merged=False, model=model)
    for module in modules.values():
        module.lora_disabled += 1
    try:
        yield
    finally:
        for module in modules.values():
            module.lora_disabled -= 1


def freeze_all_but_adapters(module: torch.nn.Module) -> None:
    """`requires_grad` on the adapter matrices only. A frozen base weight is where LoRA's speed
    comes from: Megatron's linears and TE skip the weight-grad GEMM and do not save the input."""
    for name, param in module.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
