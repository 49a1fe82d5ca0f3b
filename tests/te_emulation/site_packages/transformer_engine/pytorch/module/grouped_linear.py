"""`transformer_engine.pytorch.GroupedLinear` (TE v2.11 `module/grouped_linear.py`): the MoE
experts' linear, `num_gemms` weights in one module, `y_i = x_i W_i^T + b_i` per input split.

What TE's source does, and so what this does:
- `weight{i}` `[out, in]` (init_method under the RNG tracker) and `bias{i}` `[out]` (zeros), or
  a plain empty tensor `bias{i}` without bias; `tp_size > 1` with a bias is a `ValueError`.
- `parallel_mode` only sets the local shape ("column" divides out_features by tp_size, "row"
  in_features); there is no communication inside (the MoE token dispatcher does it).
- `reset_parameters` marks every `weight{i}` `tensor_model_parallel` with partition_dim 1 for
  "row" and 0 otherwise (so 0 when megatron passes `parallel_mode=None` under explicit expert
  communication), stride 1; a row bias gets `sequence_parallel`, a column bias TP attributes.
- `forward(inp, m_splits)`: `len(m_splits) == num_gemms`, zero-size splits allowed; the output
  is `out.view(-1, *inp.shape[1:-1], out_features)` of one fresh `[sum(m_splits), out]` tensor
  (a view, as TE returns it); `return_bias` returns `(out, [bias_i cast to the activation
  dtype])`. Backward: dgrad when the input needs it, a wgrad GEMM only when the weights require
  grad (frozen base: none, and the input is not kept); `fuse_wgrad_accumulation` adds into
  `weight{i}.main_grad` and returns megatron's dummy wgrad.
Each split's GEMM is the emulation's Linear GEMM (`_gemm.base_gemm`), so FP8 autocast rounds
the operands the same way. Not emulated: delay_wgrad_compute, Userbuffers, save_original_input
with FP8, CPU offload.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distributed import get_distributed_world_size, set_tensor_model_parallel_attributes
from ..utils import cast_if_needed, init_method_constant, resolve_device
from ._gemm import base_gemm
from ._linear_common import GEMM_PARALLEL_MODES
from .base import TransformerEngineBaseModule


class GroupedLinear(TransformerEngineBaseModule):
    """`num_gemms` linears applied to consecutive splits of the input rows."""

    def __init__(
        self,
        num_gemms: int,
        in_features: int,
        out_features: int,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker: Callable | None = None,
        rng_tracker_name: str | None = None,
        init_method: Callable | None = None,
        bias: bool = True,
        return_bias: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_mode: str | None = None,
        device="cuda",
        ub_overlap_rs: bool = False,
        ub_overlap_ag: bool = False,
        ub_name: str | None = None,
        delay_wgrad_compute: bool = False,
        save_original_input: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.num_gemms = num_gemms
        self.in_features = in_features
        self.out_features = out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias = bias
        self.return_bias = return_bias
        self.apply_bias = bias and not return_bias
        self.ub_name = ub_name
        self.save_original_input = save_original_input
        assert not ub_overlap_rs and not ub_overlap_ag, \
            "GroupedLinear doesn't support Userbuffer overlap."
        if delay_wgrad_compute:
            raise NotImplementedError("delay_wgrad_compute is not emulated")
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name
        self.name = name

        if tp_group is None:
            self.tp_size = tp_size
            if tp_size == 1:
                self.set_tensor_parallel_group(tp_group)
        else:
            self.tp_size = get_distributed_world_size(tp_group)
            self.set_tensor_parallel_group(tp_group)
        if self.tp_size > 1 and bias:
            raise ValueError("GroupedLinear doesn't support bias when TP > 1. "
                             "Because the TP communication is handled outside of this module.")
        assert parallel_mode in GEMM_PARALLEL_MODES, f"parallel_mode {parallel_mode} not supported"
        self.parallel_mode = parallel_mode
        if parallel_mode == "column":
            assert self.out_features % self.tp_size == 0
            self.out_features //= self.tp_size
        elif parallel_mode == "row":
            assert self.in_features % self.tp_size == 0
            self.in_features //= self.tp_size
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel

        device = resolve_device(device)
        for i in range(num_gemms):
            weight = torch.empty(self.out_features, self.in_features, device=device,
                                 dtype=params_dtype)
            self.register_parameter(f"weight{i}", torch.nn.Parameter(weight),
                                    init_fn=init_method,
                                    get_rng_state_tracker=get_rng_state_tracker,
                                    fp8_meta_index=1 + 3 * i)
            if self.use_bias:
                bias_i = torch.empty(self.out_features, device=device, dtype=params_dtype)
                self.register_parameter(f"bias{i}", torch.nn.Parameter(bias_i),
                                        init_fn=init_method_constant(0.0))
            else:
                setattr(self, f"bias{i}", torch.Tensor().to(dtype=params_dtype, device=device))
        self.reset_parameters(defer_init=device.type == "meta")

    def reset_parameters(self, defer_init=False):
        super().reset_parameters(defer_init=defer_init)
        if defer_init:
            return
        for i in range(self.num_gemms):
            set_tensor_model_parallel_attributes(getattr(self, f"weight{i}"), True,
                                                 1 if self.parallel_mode == "row" else 0, 1)
            if self.use_bias:
                bias = getattr(self, f"bias{i}")
                if self.parallel_mode == "row":
                    bias.sequence_parallel = self.sequence_parallel
                elif self.parallel_mode == "column":
                    set_tensor_model_parallel_attributes(bias, True, 0, 1)

    def forward(self, inp: torch.Tensor, m_splits: list[int],
                is_first_microbatch: bool | None = None):
        assert len(m_splits) == self.num_gemms, "Number of splits should match number of GEMMs."
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        with self.prepare_forward(inp, num_gemms=self.num_gemms) as inp:
            if inp.size(-1) != self.in_features:
                raise ValueError(f"Input tensor (shape={tuple(inp.size())}) is not compatible "
                                 f"with weight tensor (shape={tuple(weights[0].size())})")
            splits = torch.split(inp.reshape(-1, self.in_features), m_splits)
            recipe = self.fp8_recipe_for_gemm()
            out = torch.cat([
                base_gemm(x, w, b if self.apply_bias else None,
                          activation_dtype=self.activation_dtype, recipe=recipe,
                          fuse_wgrad_accumulation=self.fuse_wgrad_accumulation)
                for x, w, b in zip(splits, weights, biases, strict=True)])
            out = out.view(-1, *inp.shape[1:-1], self.out_features)
        if self.return_bias:
            return out, [cast_if_needed(b, self.activation_dtype) for b in biases]
        return out
