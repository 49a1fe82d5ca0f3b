"""The base GEMM of Linear and LayerNormLinear: `y = x W^T (+ b)`, FP8 when TE would use FP8.

TE v2.11 `module/linear.py` and `module/layernorm_linear.py`: inside an enabled autocast the
input and weight are quantized for the forward GEMM, the output grad for the dgrad and wgrad
GEMMs (which reuse the quantized input and weight), and the bias grad comes from the unquantized
output grad. A frozen weight (`requires_grad=False`) gets no wgrad GEMM and its input is not
kept. With `fuse_wgrad_accumulation` the wgrad is added to `weight.main_grad` and, for
megatron's DDP (`grad_added_to_main_grad`), a dummy wgrad is returned instead.
"""

from __future__ import annotations

import torch

from ...common.recipe import Recipe
from .. import emulation
from .base import get_dummy_wgrad


class _BaseGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, bias, activation_dtype, recipe, fuse_wgrad_accumulation):
        x = inp.reshape(-1, inp.shape[-1]).to(activation_dtype)
        w = weight.to(activation_dtype)
        if recipe is not None:
            x = emulation.quantize(x, emulation.fp8_dtype(recipe, forward=True))
            w = emulation.quantize(w, emulation.fp8_dtype(recipe, forward=True))
            emulation.stats["fp8_gemms"] += 1
        else:
            emulation.stats["high_precision_gemms"] += 1
        out = torch.matmul(x, w.t())
        if bias is not None:
            out = out + bias.to(activation_dtype)
        ctx.save_for_backward(x if weight.requires_grad else None, w if inp.requires_grad else None)
        ctx.weight = weight
        ctx.inp_shape = inp.shape
        ctx.recipe = recipe
        ctx.has_bias = bias is not None
        ctx.fuse_wgrad_accumulation = fuse_wgrad_accumulation
        return out.view(*inp.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        x, w = ctx.saved_tensors
        weight = ctx.weight
        dy = grad_output.reshape(-1, grad_output.shape[-1])
        dbias = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.recipe is not None:
            dy = emulation.quantize(dy, emulation.fp8_dtype(ctx.recipe, forward=False))
        dinp = torch.matmul(dy, w).view(ctx.inp_shape) if ctx.needs_input_grad[0] else None
        dweight = None
        if weight.requires_grad:
            dweight = torch.matmul(dy.t(), x)
            if ctx.fuse_wgrad_accumulation:
                weight.main_grad.add_(dweight.to(weight.main_grad.dtype))
                dweight = None
                if hasattr(weight, "grad_added_to_main_grad"):
                    weight.grad_added_to_main_grad = True
                    dweight = get_dummy_wgrad(list(weight.main_grad.shape), weight.dtype)
        return dinp, dweight, dbias, None, None, None


def base_gemm(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
              activation_dtype: torch.dtype, recipe: Recipe | None,
              fuse_wgrad_accumulation: bool = False) -> torch.Tensor:
    """`inp @ weight.T + bias` over the last dim; FP8-rounded operands when `recipe` is set."""
    return _BaseGemm.apply(inp, weight, bias, activation_dtype, recipe, fuse_wgrad_accumulation)
