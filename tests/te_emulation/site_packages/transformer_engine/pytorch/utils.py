"""Small helpers TE keeps in `pytorch/utils.py`, plus the emulation's device rule."""

from __future__ import annotations

from collections.abc import Callable

import torch


def get_default_init_method() -> Callable:
    """TE's default weight init: N(0, 0.023)."""
    return init_method_normal(0.023)


def init_method_normal(sigma: float) -> Callable:
    def init_(tensor: torch.Tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def init_method_constant(val: float) -> Callable:
    def init_(tensor: torch.Tensor):
        return torch.nn.init.constant_(tensor, val)

    return init_


def cast_if_needed(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """TE allocates on `device` (default "cuda"); without CUDA the emulation uses the CPU."""
    if device is None:
        device = "cuda"
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def is_bf16_available(return_reason: bool = False):
    return (True, "") if return_reason else True


def get_device_compute_capability():
    return (9, 0)


def get_cudnn_version():
    return (9, 0, 0)
