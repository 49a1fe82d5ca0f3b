"""What every emulated TE module shares (TE v2.11 `module/base.py`).

- Parameters are registered with an init function and the RNG tracker to run it under;
  `reset_parameters` runs it (under `get_rng_state_tracker().fork(rng_tracker_name)` when a
  tracker is given, as megatron's own GPU initialization does), unless the device is "meta".
- `prepare_forward` reads the activation dtype from the input (or torch autocast) and the FP8
  state from the global autocast, setting the module's `fp8` and `fp8_meta["recipe"]` the way
  TE's `init_fp8_metadata` does.
- `_extra_state` is an empty uint8 tensor until the module has run under FP8, then the pickled
  recipe, so state dicts carry the same keys as with real TE.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from ..quantization import FP8GlobalStateManager
from ..utils import get_default_init_method, resolve_device

_dummy_wgrads: dict[Any, torch.Tensor] = {}


def get_dummy_wgrad(shape: list, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """One reusable placeholder wgrad per shape and dtype (returned when the real wgrad went
    straight into `main_grad`)."""
    key = (shape[0], shape[1], dtype)
    if key not in _dummy_wgrads:
        _dummy_wgrads[key] = torch.empty(shape, dtype=dtype, device=resolve_device("cuda"))
    if zero:
        _dummy_wgrads[key].fill_(0)
    return _dummy_wgrads[key].detach()


@dataclasses.dataclass
class _ParameterInitMeta:
    init_fn: Callable | None = None
    get_rng_state_tracker: Callable | None = None
    fp8_meta_index: int | None = None

    def __post_init__(self):
        if self.init_fn is None:
            self.init_fn = get_default_init_method()


class TransformerEngineBaseModule(torch.nn.Module):
    """Base of the emulated Linear, LayerNormLinear and DotProductAttention."""

    def __init__(self) -> None:
        super().__init__()
        if FP8GlobalStateManager.with_fp8_parameters():
            raise NotImplementedError("FP8 primary weights (quantized_model_init) are not emulated")
        self.name = None
        self.fp8_initialized = False
        self.fp8 = False
        self.fp8_calibration = False
        self.fp8_meta = {"fp8_checkpoint": False, "fp8_group": None}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False
        self.param_init_meta: dict[str, _ParameterInitMeta] = {}
        self.primary_weights_in_fp8 = False
        self.fsdp_wrapped = False
        self.fsdp_group = None
        self.activation_dtype: torch.dtype | None = None
        self.tp_group_initialized = False

    def register_parameter(self, name, param, **kwargs):
        super().register_parameter(name, param)
        if name not in self.param_init_meta:
            self.param_init_meta[name] = _ParameterInitMeta(**kwargs)

    def reset_parameters(self, defer_init: bool | None = False) -> None:
        if defer_init:
            return
        for name, param in self.named_parameters(recurse=False):
            if param.device.type == "meta":
                param = torch.nn.Parameter(torch.empty_like(param, device=resolve_device(None)))
                setattr(self, name, param)
            meta = self.param_init_meta[name]
            with torch.no_grad():
                if meta.get_rng_state_tracker is None:
                    meta.init_fn(param)
                else:
                    tracker_name = getattr(self, "rng_tracker_name", None)
                    fork = meta.get_rng_state_tracker().fork
                    with fork(tracker_name) if tracker_name else fork():
                        meta.init_fn(param)

    def set_tensor_parallel_group(self, tp_group) -> None:
        self.tp_group = tp_group
        self.tp_group_initialized = True

    def set_activation_dtype(self, inp: torch.Tensor) -> None:
        """The dtype the GEMMs run in: torch autocast's, else the input's (which must then match
        the parameters' dtype, as TE asserts)."""
        if torch.is_autocast_enabled():
            self.activation_dtype = torch.get_autocast_dtype("cuda")
            return
        if torch.is_autocast_enabled("cpu"):
            self.activation_dtype = torch.get_autocast_dtype("cpu")
            return
        for name, param in self.named_parameters():
            assert inp.dtype == param.dtype, (
                "Data types for parameters must match when outside of autocasted region. "
                f" Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}")
        self.activation_dtype = inp.dtype

    def init_fp8_metadata(self, num_gemms: int = 1) -> None:
        self.fp8 = FP8GlobalStateManager.is_fp8_enabled()
        self.fp8_calibration = FP8GlobalStateManager.is_fp8_calibration()
        self.fp8_meta["fp8_checkpoint"] = self.fp8 or self.fp8_calibration
        if self.fp8 or self.fp8_calibration:
            self.fp8_meta["recipe"] = FP8GlobalStateManager.get_fp8_recipe()
            self.fp8_meta["fp8_group"] = FP8GlobalStateManager.get_fp8_group()
            self.fp8_meta["num_gemms"] = num_gemms
            self.fp8_initialized = True
        else:
            self.fp8_initialized = False

    @contextmanager
    def prepare_forward(self, inp: torch.Tensor, num_gemms: int = 1,
                        allow_non_contiguous: bool = False):
        if self.tp_size > 1:
            assert self.tp_group_initialized, "TP group not initialized."
        self.set_activation_dtype(inp)
        self.init_fp8_metadata(num_gemms=num_gemms)
        if not allow_non_contiguous and not inp.is_contiguous():
            inp = inp.contiguous()
        yield inp

    def fp8_recipe_for_gemm(self):
        """The recipe the base GEMM quantizes with, or None for a high-precision GEMM."""
        return self.fp8_meta["recipe"] if self.fp8 else None

    def get_extra_state(self) -> torch.Tensor:
        if not (self.fp8_meta["fp8_checkpoint"] or self.fp8 or self.fp8_calibration):
            return torch.empty(0, dtype=torch.uint8)
        extra = {k: v for k, v in self.fp8_meta.items()
                 if isinstance(v, (bool, int, float, str, tuple, list))}
        state = {"recipe": self.fp8_meta["recipe"], "extra_fp8_variables": extra}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, torch.Tensor) and state.numel() == 0):
            return
        state = pickle.loads(state.detach().cpu().numpy().tobytes())
        self.fp8_meta.update(state["extra_fp8_variables"])
        self.fp8_meta["recipe"] = state["recipe"]

    def backward_dw(self):
        """Delayed wgrad (delay_wgrad_compute) is not emulated, so there is nothing to run."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError
