"""`transformer_engine.pytorch.Linear` (TE v2.11 `module/linear.py`).

forward(inp) -> out, or (out, bias) with return_bias:
- column: each rank holds `out_features / tp` rows of the weight. Under sequence parallelism the
  input is this rank's sequence shard and is all-gathered along dim 0 first (backward:
  reduce-scatter of dgrad); otherwise dgrad is all-reduced over the TP group.
- row: each rank holds `in_features / tp` columns and gets its input split on the last dim; the
  partial outputs are reduce-scattered along dim 0 (SP) or all-reduced, then the bias is added.
- None: no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..utils import cast_if_needed, resolve_device
from ._gemm import base_gemm
from ._linear_common import (
    mark_weight_and_bias,
    refuse_unemulated,
    register_weight_and_bias,
    setup_parallelism,
)
from ._tp_comm import column_parallel_input, row_parallel_output
from .base import TransformerEngineBaseModule


class Linear(TransformerEngineBaseModule):
    """y = x A^T + b, tensor-parallel as `parallel_mode` says."""

    def __init__(
        self,
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
        parameters_split: tuple[str, ...] | dict[str, int] | None = None,
        device: torch.device | str = "cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_name: str | None = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: str | None = None,
        save_original_input: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features = in_features
        self.out_features = out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.use_bias = bias
        self.return_bias = return_bias
        self.apply_bias = bias and not return_bias
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name
        self.symmetric_ar_type = symmetric_ar_type
        self.save_original_input = save_original_input
        self.name = name
        self.ub_name = ub_name
        setup_parallelism(self, tp_group=tp_group, tp_size=tp_size, parallel_mode=parallel_mode,
                          sequence_parallel=sequence_parallel)
        sp = self.sequence_parallel
        refuse_unemulated(
            parameters_split=parameters_split, delay_wgrad_compute=delay_wgrad_compute,
            ub_flags=(sp and ub_overlap_ag, sp and ub_overlap_rs, sp and ub_overlap_rs_dgrad,
                      sp and ub_bulk_dgrad, sp and ub_bulk_wgrad))
        register_weight_and_bias(self, init_method=init_method,
                                 get_rng_state_tracker=get_rng_state_tracker,
                                 params_dtype=params_dtype, device=device)
        self.reset_parameters(defer_init=resolve_device(device).type == "meta")
        # A row-parallel bias is added after the reduction, so it is not fused into the GEMM.
        self.gemm_bias_unfused_add = self.parallel_mode == "row" and self.apply_bias

    def reset_parameters(self, defer_init=False):
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            mark_weight_and_bias(self)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None,
                fp8_output: bool | None = False, fp8_grad: bool | None = False):
        with self.prepare_forward(inp, allow_non_contiguous=False) as inp:
            x = inp
            if self.parallel_mode == "column":
                x = column_parallel_input(x, self.tp_group, self.tp_size, self.sequence_parallel)
            fused_bias = self.bias if self.apply_bias and not self.gemm_bias_unfused_add else None
            out = base_gemm(x, self.weight, fused_bias, activation_dtype=self.activation_dtype,
                            recipe=self.fp8_recipe_for_gemm(),
                            fuse_wgrad_accumulation=self.fuse_wgrad_accumulation)
            if self.parallel_mode == "row":
                out = row_parallel_output(out, self.tp_group, self.tp_size,
                                          self.sequence_parallel)
        if self.gemm_bias_unfused_add:
            out = out + cast_if_needed(self.bias, self.activation_dtype)
        if self.return_bias:
            return out, cast_if_needed(self.bias, self.activation_dtype)
        return out
