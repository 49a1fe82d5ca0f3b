"""`lora_linear`: `x W^T + b + s * (x A^T) B^T` as one autograd node, with no output-sized
work beyond the base GEMM.

Composed from ordinary ops, autograd would give the input two gradients (through W and
through A), allocate both `[tokens, in]` tensors and add them. Written out, the backward
accumulates the LoRA part into the base part in place:

    forward                          backward (g = dL/dy, [tokens, out])
    y = x W^T + b        (GEMM)      g_h = s * g B          [tokens, r]
    h = x A^T            (GEMM)      g_x = g W  += g_h A    (GEMM, then addmm_ in place)
    y += s * h B^T       (addmm_)    g_A = g_h^T x          [r, in]
                                     g_B = s * g^T h        [out, r]
                                     g_W = g^T x, g_b = sum(g)   only if the base trains

Saved for backward: `x` and `h` (A needs x; B needs h), plus the parameters themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        out = F.linear(x, weight, bias)                     # [tokens, out]
        hidden = F.linear(x, lora_a)                        # [tokens, r]
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, hidden)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, hidden = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lora_b, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_hidden = grad.mm(lora_b).mul_(ctx.scaling) if need_x or need_a else None
        grad_x = grad.mm(weight).addmm_(grad_hidden, lora_a) if need_x else None
        grad_w = grad.t().mm(x) if need_w else None
        grad_b = grad.sum(0) if need_b else None
        grad_a = grad_hidden.t().mm(x) if need_a else None
        grad_lora_b = grad.t().mm(hidden).mul_(ctx.scaling) if need_lora_b else None
        return grad_x, grad_w, grad_b, grad_a, grad_lora_b, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`x` [tokens, in], `weight` [out, in], `bias` [out] or None, `lora_a` [r, in],
    `lora_b` [out, r] -> [tokens, out]. All of one dtype, no autocast (the caller checks)."""
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scaling)
