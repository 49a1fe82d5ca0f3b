"""The adapter of a grouped (MoE) linear: one autograd node for all local experts.

The grouped linear's input rows are split by expert (`m_splits`: expert e's tokens are rows
`offset_e .. offset_e + m_e`). Expert e's adapter is `A_e [r, in]`, `B_e [out, r]`; either may be
one matrix shared by the experts (`shared_outer`: fc1's A, fc2's B). In Megatron's terms, with
x `[tokens, in]` and the base output `[tokens, out]` of this rank:

    h_e = x_e A_e^T          [m_e, r]
    y_e += scaling * h_e B_e^T

A shared A is one GEMM over all tokens (`x A^T`), a shared B likewise; per-expert matrices are a
grouped GEMM: `torch._grouped_mm` on CUDA (one kernel for all experts), a loop over experts
elsewhere (`impl` picks; both give the same products). The output is accumulated in place where
autograd allows, as the dense adapter's is (`functional.AccumulateLoRAOutput`).

Backward, per expert: dh_e = scaling * g_e B_e, dB_e = scaling * g_e^T h_e, dx_e = dh_e A_e,
dA_e = dh_e^T x_e (for a shared matrix the sums over experts: one GEMM over all tokens).
"""

from __future__ import annotations

import functools

import torch

LOOP, GROUPED_MM = "loop", "grouped_mm"


def default_impl(x: torch.Tensor) -> str:
    """`torch._grouped_mm` on CUDA where torch has it, the loop elsewhere."""
    return GROUPED_MM if x.is_cuda and hasattr(torch, "_grouped_mm") else LOOP


def _aligned(*tensors: torch.Tensor) -> bool:
    """`torch._grouped_mm` needs every non-unit stride (and the data) 16-byte aligned."""
    return all(t.data_ptr() % 16 == 0 and all(
        (stride * t.element_size()) % 16 == 0 for stride in t.stride() if stride != 1)
        for t in tensors)


@functools.lru_cache(maxsize=64)
def _offsets(splits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(splits, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, splits: tuple[int, ...],
               impl: str) -> torch.Tensor:
    """`[x_e @ weights[e] for each split e]` stacked: x `[tokens, K]`, weights `[E, K, N]`
    -> `[tokens, N]`."""
    if impl == GROUPED_MM and _aligned(x, weights):
        return torch._grouped_mm(x, weights, offs=_offsets(splits, x.device))
    return torch.cat([part @ w for part, w in zip(x.split(list(splits)), weights, strict=True)])


def grouped_outer(a: torch.Tensor, b: torch.Tensor, splits: tuple[int, ...],
                  impl: str) -> torch.Tensor:
    """`[a_e^T @ b_e for each split e]`: a `[tokens, M]`, b `[tokens, N]` -> `[E, M, N]`."""
    if impl == GROUPED_MM and _aligned(a.t(), b):
        return torch._grouped_mm(a.t(), b, offs=_offsets(splits, a.device))
    pairs = zip(a.split(list(splits)), b.split(list(splits)), strict=True)
    return torch.stack([pa.t() @ pb for pa, pb in pairs])


def _project(x, A, splits, impl):
    """h `[tokens, r]`: x A^T (A `[r, in]`, shared) or x_e A_e^T (A `[E, r, in]`)."""
    return x @ A.t() if A.dim() == 2 else grouped_mm(x, A.transpose(1, 2), splits, impl)


def _expand(h, B, splits, impl):
    """`[tokens, out]`: h B^T (B `[out, r]`, shared) or h_e B_e^T (B `[E, out, r]`)."""
    return h @ B.t() if B.dim() == 2 else grouped_mm(h, B.transpose(1, 2), splits, impl)


class GroupedLoRAOutput(torch.autograd.Function):
    """`output + scaling * adapter(x)` for a grouped linear (see the module docstring)."""

    @staticmethod
    def forward(ctx, output, x, A, B, splits, scaling, impl):
        x2d = x.reshape(-1, x.shape[-1])                                     # [tokens, in]
        h = _project(x2d, A, splits, impl)                                   # [tokens, r]
        ctx.save_for_backward(x2d, h, A, B)
        ctx.splits, ctx.scaling, ctx.impl, ctx.x_shape = splits, scaling, impl, x.shape
        out2d = output.reshape(-1, output.shape[-1])                         # [tokens, out]
        if output._is_view() or not output.is_contiguous():
            return (out2d + _expand(h * scaling, B, splits, impl)).view(output.shape)
        if B.dim() == 2:
            out2d.addmm_(h, B.t(), alpha=scaling)
        elif impl == LOOP:
            for rows, h_e, B_e in zip(out2d.split(list(splits)), h.split(list(splits)), B,
                                      strict=True):
                rows.addmm_(h_e, B_e.t(), alpha=scaling)
        else:
            out2d.add_(_expand(h * scaling, B, splits, impl))
        ctx.mark_dirty(output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x2d, h, A, B = ctx.saved_tensors
        splits, scaling, impl = ctx.splits, ctx.scaling, ctx.impl
        g = grad.reshape(-1, grad.shape[-1])                                 # [tokens, out]
        # dh = scaling * g B (per expert: g_e B_e)
        dh = (g @ B if B.dim() == 2 else grouped_mm(g, B, splits, impl)) * scaling
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[3]:
            grad_B = ((h.t() @ g).t() if B.dim() == 2
                      else grouped_outer(g, h, splits, impl)) * scaling       # [(E,) out, r]
        if ctx.needs_input_grad[1]:
            grad_x = (dh @ A if A.dim() == 2
                      else grouped_mm(dh, A, splits, impl)).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_A = dh.t() @ x2d if A.dim() == 2 else grouped_outer(dh, x2d, splits, impl)
        return grad, grad_x, grad_A, grad_B, None, None, None


def grouped_lora_output(output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        splits, scaling: float, impl: str | None = None) -> torch.Tensor:
    """`output + scaling * adapter(x)`; A `[r, in]` or `[E, r, in]`, B `[out, r]` or
    `[E, out, r]`, `splits` the tokens per local expert."""
    if A.dtype != output.dtype:  # e.g. an fp32 base output with bf16 adapters
        A, B = A.to(output.dtype), B.to(output.dtype)
    x = x.to(output.dtype)
    return GroupedLoRAOutput.apply(output, x, A, B, tuple(int(m) for m in splits), scaling,
                                   impl or default_impl(x))
