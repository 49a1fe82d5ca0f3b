"""The adapter matrices as modules, so the state-dict names are PEFT's: `LoRAFactor` holds one
matrix as `lora_A.weight` / `lora_B.weight`; `LoRAExpertFactors` one matrix per expert of a
grouped linear as `lora_A.weight0`, `lora_A.weight1`, ... (the numbering of the grouped
linear's own `weight0`, `weight1`, ...). `AdapterPair` names one base weight with the two
matrices that update it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lora.layers.sharded_state import NOT_IN_CHECKPOINT


class LoRAFactor(torch.nn.Module):
    """A (`[r, in]`) or B (`[out, r]`) of a LoRA linear: this rank's shard, no forward.

    Not an `nn.Linear`: constructing one would draw an init from the global RNG, which would
    shift every base weight drawn after it. Values come from the owning layer
    (`reset_lora_parameters`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def matrices(self, count: int) -> list[torch.nn.Parameter]:
        """The matrix each of `count` experts uses: this one, shared."""
        return [self.weight] * count

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dist checkpoint without this adapter (`sharded_state.NOT_IN_CHECKPOINT`): leave it
        # as it is, reported as a missing key, as an adapter absent from the state dict is.
        state_dict = _without_absent(state_dict, [f"{prefix}weight"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LoRAExpertFactors(torch.nn.Module):
    """A or B of each local expert of a grouped linear (`weight<i>`, expert i's matrix)."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.count = len(weights)
        for i, weight in enumerate(weights):
            self.register_parameter(f"weight{i}", torch.nn.Parameter(weight))

    def matrices(self, count: int) -> list[torch.nn.Parameter]:
        assert count == self.count
        return [getattr(self, f"weight{i}") for i in range(self.count)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # As LoRAFactor's: an expert's matrix the dist checkpoint does not hold stays as it is.
        state_dict = _without_absent(state_dict, [f"{prefix}weight{i}" for i in range(self.count)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class AdapterPair:
    """One base weight and its adapter: `weight + scaling * B @ A` is its merged value. Names
    are relative to the module (`weight3`, `lora_A.weight3` or, shared, `lora_A.weight`)."""

    weight_name: str
    weight: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    a_name: str
    b_name: str


def _without_absent(state_dict, keys):
    """`state_dict` less the `keys` a dist-checkpoint load marked NOT_IN_CHECKPOINT."""
    absent = {key for key in keys if state_dict.get(key) is NOT_IN_CHECKPOINT}
    return {k: v for k, v in state_dict.items() if k not in absent} if absent else state_dict
