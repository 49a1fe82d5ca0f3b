"""The adapter's arithmetic, apart from any module: the output accumulation (one autograd
node) and a weight shard's merged value."""

from __future__ import annotations

import torch

from lora_common.delta import merged_value


class AccumulateLoRAOutput(torch.autograd.Function):
    """`output + scaling * h B^T` as one autograd node, written into `output` itself.

    output [s, b, out] (or [s/tp, b, out] under SP)   h [..., r] on the same tokens   B [out, r]

    A base linear's output is a fresh tensor that nothing saved for backward, so the adapter's
    GEMM can accumulate into it (`addmm_`, beta = 1): no second output-sized tensor, no copy
    of the base output, and the scaling rides on the GEMM. Outputs that are views (a
    row-parallel linear's all-reduce returns its input as-is, which autograd turns into a
    view) cannot be modified in place; they get an out-of-place addmm.
    Backward: dh = (g B) * scaling as autograd's `addmm` computes it; dB = (h^T g)^T * scaling,
    the same products summed in another order than autograd's `g^T h` (which is 1.5-2x slower
    on CPU BLAS for an [out, tokens] x [tokens, r] GEMM); g passes to the base unchanged.
    """

    @staticmethod
    def forward(ctx, output, h, B, scaling):
        ctx.save_for_backward(h, B)
        ctx.scaling = scaling
        h2d = h.reshape(-1, h.shape[-1])                          # [tokens, r]
        if output._is_view() or not output.is_contiguous():
            flat = torch.addmm(output.reshape(-1, output.shape[-1]), h2d, B.t(), alpha=scaling)
            return flat.view(output.shape)
        output.view(-1, output.shape[-1]).addmm_(h2d, B.t(), alpha=scaling)
        ctx.mark_dirty(output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, B = ctx.saved_tensors
        g2d = grad.reshape(-1, grad.shape[-1])                    # [tokens, out]
        grad_h = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_h = (g2d.mm(B) * ctx.scaling).view(h.shape)      # [..., r]
        if ctx.needs_input_grad[2]:
            grad_B = (h.reshape(-1, h.shape[-1]).t().mm(g2d) * ctx.scaling).t()   # [out, r]
        return grad, grad_h, grad_B, None


def accumulate_lora_output(output: torch.Tensor, h: torch.Tensor, B: torch.Tensor,
                           scaling: float) -> torch.Tensor:
    """`output + scaling * h B^T`, in place where autograd allows (see `AccumulateLoRAOutput`)."""
    if h.dtype != output.dtype:  # e.g. an fp32 base output with bf16 adapters
        h, B = h.to(output.dtype), B.to(output.dtype)
    return AccumulateLoRAOutput.apply(output, h, B, scaling)


def is_te_quantized(tensor: torch.Tensor) -> bool:
    """A Transformer Engine quantized tensor (Float8Tensor, MXFP8Tensor, ...): TE's tensor
    subclasses live in `transformer_engine.pytorch.tensor`; no TE import needed to tell."""
    return type(tensor).__module__.startswith("transformer_engine.")


def merged_shard(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 device=None) -> torch.Tensor:
    """`W + scaling * B @ A` for one weight shard, on `device` (default: W's), in W's dtype.

    With FP8 primary weights (TE's `fp8_model_init`, Megatron's `--fp8-param-gather`) W is a TE
    quantized tensor with no high-precision copy; its dequantized value is exactly what the
    base GEMM uses, so the merge starts from that (a bf16 result, never re-quantized here)."""
    device = weight.device if device is None else device
    base = weight.dequantize() if is_te_quantized(weight) else weight
    return merged_value(base.to(device), A.to(device), B.to(device), scaling)
