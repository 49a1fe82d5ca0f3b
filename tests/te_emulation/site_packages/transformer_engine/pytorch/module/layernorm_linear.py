"""`transformer_engine.pytorch.LayerNormLinear` (TE v2.11 `module/layernorm_linear.py`).

Normalizes the input (LayerNorm or RMSNorm, `layer_norm_weight`/`layer_norm_bias`), then runs
the same tensor-parallel GEMM as `Linear`. forward(inp) returns `out`, `(out, bias)` with
return_bias, and the norm output appended when `return_layernorm_output` is set (read at every
forward, so it can be switched on for a built module):
- the returned norm output is the high-precision tensor fed to the GEMM (TE skips its quantized
  norm kernel when it must return the norm output); under sequence parallelism it is this
  rank's sequence shard, and its gradient is added to the GEMM's dgrad before the norm's
  backward (TE: `dgrad = dgrad + grad_outputs[1]`);
- with `return_layernorm_output_gathered` the returned tensor is the all-gathered norm output,
  and, as in TE through 2.18, the gradient flowing into it is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..utils import cast_if_needed, init_method_constant, resolve_device
from ._gemm import base_gemm
from ._linear_common import (
    mark_weight_and_bias,
    refuse_unemulated,
    register_weight_and_bias,
    setup_parallelism,
)
from ._norm import normalize
from ._tp_comm import column_parallel_input, discard_grad, row_parallel_output
from .base import TransformerEngineBaseModule


class LayerNormLinear(TransformerEngineBaseModule):
    """y = norm(x) A^T + b, tensor-parallel as `parallel_mode` says."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker: Callable | None = None,
        init_method: Callable | None = None,
        bias: bool = True,
        normalization: str = "LayerNorm",
        return_bias: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_mode: str | None = None,
        return_layernorm_output: bool = False,
        return_layernorm_output_gathered: bool = False,
        parameters_split: tuple[str, ...] | dict[str, int] | None = None,
        zero_centered_gamma: bool = False,
        device: torch.device | str = "cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_name: str | None = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: str | None = None,
        name: str = None,
    ) -> None:
        super().__init__()
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        assert normalization in ["LayerNorm", "RMSNorm"], "Unsupported normalization type!"
        self.in_features = in_features
        self.out_features = out_features
        self.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        self.normalization = normalization
        self.use_bias = bias
        self.return_bias = return_bias
        self.apply_bias = bias and not return_bias
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = (
            return_layernorm_output_gathered if return_layernorm_output else False)
        self.zero_centered_gamma = zero_centered_gamma
        self.symmetric_ar_type = symmetric_ar_type
        self.name = name
        self.ub_name = ub_name
        self.eps = eps
        setup_parallelism(self, tp_group=tp_group, tp_size=tp_size, parallel_mode=parallel_mode,
                          sequence_parallel=sequence_parallel)
        sp = self.sequence_parallel
        refuse_unemulated(
            parameters_split=parameters_split, delay_wgrad_compute=delay_wgrad_compute,
            ub_flags=(sp and ub_overlap_ag, sp and ub_overlap_rs, sp and ub_overlap_rs_dgrad,
                      sp and ub_bulk_dgrad, sp and ub_bulk_wgrad))
        norm_device = resolve_device(device)
        self.register_parameter(
            "layer_norm_weight",
            torch.nn.Parameter(torch.empty(self.in_features, device=norm_device,
                                           dtype=params_dtype)),
            init_fn=init_method_constant(float(not self.zero_centered_gamma)))
        if self.normalization != "RMSNorm":
            self.register_parameter(
                "layer_norm_bias",
                torch.nn.Parameter(torch.empty(self.in_features, device=norm_device,
                                               dtype=params_dtype)),
                init_fn=init_method_constant(0.0))
        else:
            self.layer_norm_bias = None
        register_weight_and_bias(self, init_method=init_method,
                                 get_rng_state_tracker=get_rng_state_tracker,
                                 params_dtype=params_dtype, device=device)
        self.reset_parameters(defer_init=norm_device.type == "meta")
        self.gemm_bias_unfused_add = self.parallel_mode == "row" and self.apply_bias

    def reset_parameters(self, defer_init=False):
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            # Under SP each rank normalizes its own sequence shard: the norm grads are partial.
            self.layer_norm_weight.sequence_parallel = self.sequence_parallel
            if self.normalization != "RMSNorm":
                self.layer_norm_bias.sequence_parallel = self.sequence_parallel
            mark_weight_and_bias(self)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None,
                fp8_output: bool | None = False, fp8_grad: bool | None = False):
        with self.prepare_forward(inp, allow_non_contiguous=False) as inp:
            ln_out = normalize(inp.to(self.activation_dtype), self.layer_norm_weight,
                               self.layer_norm_bias, self.eps, self.normalization,
                               self.zero_centered_gamma)
            x = ln_out
            if self.parallel_mode == "column":
                x = column_parallel_input(ln_out, self.tp_group, self.tp_size,
                                          self.sequence_parallel)
            ln_out_return = ln_out
            if self.return_layernorm_output_gathered:
                ln_out_return = discard_grad(x if self.sequence_parallel else ln_out)
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
            bias = cast_if_needed(self.bias, self.activation_dtype)
            if self.return_layernorm_output:
                return out, bias, ln_out_return
            return out, bias
        if self.return_layernorm_output:
            return out, ln_out_return
        return out
