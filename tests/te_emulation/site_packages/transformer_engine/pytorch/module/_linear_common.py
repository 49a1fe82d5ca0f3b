"""Construction shared by Linear and LayerNormLinear (TE v2.11 `Linear.__init__`,
`LayerNormLinear.__init__`): TP group and size, the per-rank weight shape, the weight and bias
parameters with TE's init functions and parallel attributes, and the options the emulation does
not model."""

from __future__ import annotations

import torch

from ..distributed import get_distributed_world_size, set_tensor_model_parallel_attributes
from ..utils import init_method_constant, resolve_device

GEMM_PARALLEL_MODES = ("row", "column", None)


def refuse_unemulated(*, parameters_split=None, delay_wgrad_compute=False, ub_flags=()) -> None:
    if parameters_split is not None:
        raise NotImplementedError("parameters_split is not emulated")
    if delay_wgrad_compute:
        raise NotImplementedError("delay_wgrad_compute is not emulated")
    if any(ub_flags):
        raise NotImplementedError("Userbuffers comm+GEMM overlap (ub_*) is not emulated")


def setup_parallelism(module, *, tp_group, tp_size: int, parallel_mode: str | None,
                      sequence_parallel: bool) -> None:
    """TE: the group's size wins over `tp_size`; the local weight shape follows the mode;
    sequence parallelism is only on when there is more than one TP rank."""
    if tp_group is None:
        module.tp_size = tp_size
        if tp_size == 1:
            module.set_tensor_parallel_group(tp_group)
    else:
        module.tp_size = get_distributed_world_size(tp_group)
        module.set_tensor_parallel_group(tp_group)
    assert parallel_mode in GEMM_PARALLEL_MODES, f"parallel_mode {parallel_mode} not supported"
    module.parallel_mode = parallel_mode
    if parallel_mode == "column":
        assert module.out_features % module.tp_size == 0
        module.out_features //= module.tp_size
    elif parallel_mode == "row":
        assert module.in_features % module.tp_size == 0
        module.in_features //= module.tp_size
    module.sequence_parallel = module.tp_size > 1 and sequence_parallel


def register_weight_and_bias(module, *, init_method, get_rng_state_tracker, params_dtype,
                             device) -> None:
    """`weight` [out, in] (init_method under the RNG tracker) and `bias` [out] (zeros), or an
    empty tensor when there is no bias."""
    device = resolve_device(device)
    weight = torch.empty(module.out_features, module.in_features, device=device,
                         dtype=params_dtype)
    module.register_parameter("weight", torch.nn.Parameter(weight), init_fn=init_method,
                              get_rng_state_tracker=get_rng_state_tracker, fp8_meta_index=1)
    if module.use_bias:
        bias = torch.empty(module.out_features, device=device, dtype=params_dtype)
        module.register_parameter("bias", torch.nn.Parameter(bias),
                                  init_fn=init_method_constant(0.0))
    else:
        module.bias = torch.Tensor().to(dtype=params_dtype, device=device)


def mark_weight_and_bias(module) -> None:
    """Attributes TE sets in reset_parameters: the weight is split on dim 0 (column) or 1 (row);
    a column bias is split with it; a row bias is whole, with partial grads under SP."""
    set_tensor_model_parallel_attributes(module.weight, True,
                                         1 if module.parallel_mode == "row" else 0, 1)
    if module.use_bias:
        if module.parallel_mode == "row":
            module.bias.sequence_parallel = module.sequence_parallel
        elif module.parallel_mode == "column":
            set_tensor_model_parallel_attributes(module.bias, True, 0, 1)
