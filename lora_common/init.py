"""Initial values of the adapter matrices, reproducible from a seed and a module's place.

A is drawn over its full (unsharded) shape from a private generator seeded by
`(config.seed, key)`, where `key` names the module's place in the model (e.g. the global layer
number and the name inside the layer). So A does not depend on the tensor-parallel size, the
pipeline split, or the global RNG stream, and no two modules share an A. B starts at zero.
"""

from __future__ import annotations

import hashlib
import math

import torch

from lora_common.config import LoRAConfig


def adapter_seed(seed: int, *key: object) -> int:
    """A 63-bit generator seed from the config seed and a module key (stable across runs,
    processes and Python versions, unlike `hash`)."""
    text = ":".join(str(part) for part in (seed, *key))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def initial_lora_A(config: LoRAConfig, in_features: int, *key: object) -> torch.Tensor:
    """The full `[r, in_features]` fp32 A for the module named by `key`.

    `kaiming` is PEFT's default (kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(in))),
    `gaussian` is PEFT's N(0, 1/r).
    """
    generator = torch.Generator().manual_seed(adapter_seed(config.seed, *key))
    a = torch.empty(config.r, in_features)
    if config.init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        return a.uniform_(-bound, bound, generator=generator)
    return a.normal_(0.0, 1.0 / config.r, generator=generator)
