"""`transformer_engine.pytorch.DotProductAttention` (TE v2.11
`attention/dot_product_attention/dot_product_attention.py`), computed the way TE's
UnfusedDotProductAttention backend does: softmax(scale * Q K^T + mask) V with fp32 softmax.

Each rank holds `num_attention_heads / tp` query heads and `num_gqa_groups / tp` key/value heads
(GQA: each key/value head serves `heads / groups` consecutive query heads). Formats sbhd and
bshd; output [s, b, h * d] (sbhd) or [b, s, h * d] (bshd). Masks: "no_mask", "causal" (top-left
aligned), "causal_bottom_right", "padding", "padding_causal", "arbitrary" (`attention_mask` True
= masked out), plus a post-scale bias. Attention dropout runs under the RNG tracker's fork unless
sequence parallel (as in TE). THD (packed sequences, `cu_seqlens_q/kv` and their `_padded`
offsets, as Megatron's `PackedSeqParams` passes them): each sequence attends within itself,
causally for the causal mask types; tokens in the padding between sequences give zeros, as TE's
zero-filled output. Context parallelism with THD (TE's `cp_group`, any `cp_comm_type`: they
differ in how K/V travel, not in what is computed): each rank holds, of every sequence of
`cu_seqlens` (the full sequences' offsets), the chunks `r` and `2 cp - 1 - r` of `2 cp` equal
ones (the zigzag layout Megatron and slime split sequences in); its queries attend to the whole
sequence's keys, gathered over the CP group (backward: each rank's key/value grads summed back to
it). Not emulated: sliding windows, context parallelism with sbhd/bshd, FP8 attention,
non-vanilla softmax, returning the max logit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..distributed import get_distributed_world_size
from ..module.base import TransformerEngineBaseModule


class _GatherOverCP(torch.autograd.Function):
    """[t, ...] of every CP rank, concatenated in rank order; backward: the sum over the ranks of
    the grad of this rank's rows."""

    @staticmethod
    def forward(ctx, tensor, group):
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        ctx.group, ctx.rows = group, tensor.shape[0]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def _thd_positions(cu, cu_padded, total: int, cp_rank: int = 0, cp_size: int = 1):
    """(sequence index, position in the sequence, valid) of each token of a rank's packed
    tokens: `cu` the sequences' (full) lengths, `cu_padded` where they start in the full layout;
    under CP a rank holds `1 / cp` of each sequence, its chunks `cp_rank` and
    `2 cp - 1 - cp_rank`."""
    starts = (cu if cu_padded is None else cu_padded).tolist()
    lengths = (cu[1:] - cu[:-1]).tolist()
    seq = torch.full((total,), -1, dtype=torch.long)
    pos = torch.zeros(total, dtype=torch.long)
    for i, length in enumerate(lengths):
        padded = starts[i + 1] - starts[i]
        if cp_size > 1 and padded % (2 * cp_size):
            raise NotImplementedError(f"sequence {i} of {padded} tokens does not split into "
                                      f"{2 * cp_size} chunks")
        if cp_size == 1:
            where = torch.arange(padded)
        else:
            chunk = padded // (2 * cp_size)
            second = 2 * cp_size - 1 - cp_rank
            where = torch.cat([torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                               torch.arange(second * chunk, (second + 1) * chunk)])
        local = slice(starts[i] // cp_size, (starts[i] + padded) // cp_size)
        seq[local] = torch.where(where < length, i, -1)
        pos[local] = where
    return seq, pos, seq >= 0


def _causal_mask(sq: int, sk: int, bottom_right: bool, device) -> torch.Tensor:
    """True above the diagonal (masked), aligned top-left or bottom-right."""
    offset = sk - sq if bottom_right else 0
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1 + offset)


class DotProductAttention(TransformerEngineBaseModule):
    """Scaled dot-product attention over per-rank heads."""

    def __init__(
        self,
        num_attention_heads: int,
        kv_channels: int | tuple[int, int],
        num_gqa_groups: int | None = None,
        attention_dropout: float = 0.0,
        qkv_format: str = "sbhd",
        attn_mask_type: str = "causal",
        window_size: tuple[int, int] | None = None,
        sequence_parallel: bool = False,
        tp_size: int = 1,
        get_rng_state_tracker: Callable | None = None,
        tp_group=None,
        layer_number: int | None = None,
        attention_type: str = "self",
        cp_group=None,
        cp_global_ranks=None,
        cp_stream=None,
        cp_comm_type: str = "p2p",
        softmax_scale: float | None = None,
        softmax_type: str = "vanilla",
        return_max_logit: bool | None = False,
    ) -> None:
        super().__init__()
        self.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        if softmax_type != "vanilla" or return_max_logit:
            raise NotImplementedError("only vanilla softmax is emulated")
        self.qkv_format = qkv_format
        attn_mask_type = attn_mask_type.replace(",", "_")
        if attn_mask_type == "causal_padding":
            attn_mask_type = "padding_causal"
        self.attn_mask_type = attn_mask_type
        self._check_window(window_size)
        if tp_group is None:
            self.tp_size = tp_size
            if tp_size == 1:
                self.set_tensor_parallel_group(tp_group)
        else:
            self.tp_size = get_distributed_world_size(tp_group)
            self.set_tensor_parallel_group(tp_group)
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        assert num_attention_heads % self.num_gqa_groups == 0, (
            "The number of attention heads must be divisible by the number of GQA groups!")
        self.num_gqa_groups_per_partition = self.num_gqa_groups // self.tp_size
        self.layer_number = 1 if layer_number is None else layer_number
        self.attention_type = attention_type
        self.attention_dropout = attention_dropout
        self.softmax_type = softmax_type
        self.get_rng_state_tracker = get_rng_state_tracker
        k_channels = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.softmax_scale = 1.0 / math.sqrt(k_channels) if softmax_scale is None else softmax_scale
        if sequence_parallel or get_rng_state_tracker is None:
            self.attention_dropout_ctx = nullcontext
        else:
            self.attention_dropout_ctx = get_rng_state_tracker().fork

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream,
                                   cp_comm_type: str = "p2p") -> None:
        """TE's: the CP group (None: no context parallelism)."""
        if cp_comm_type not in ("p2p", "all_gather", "a2a", "a2a+p2p"):
            raise NotImplementedError(f"cp_comm_type {cp_comm_type!r}")
        if isinstance(cp_group, list):  # a2a+p2p: [a2a group, p2p group]
            raise NotImplementedError("hierarchical context parallelism is not emulated")
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else get_distributed_world_size(cp_group)

    @staticmethod
    def _check_window(window_size) -> None:
        if window_size is not None and tuple(window_size) not in ((-1, -1), (-1, 0)):
            raise NotImplementedError("sliding-window attention is not emulated")

    def forward(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        value_layer: torch.Tensor,
        attention_mask=None,
        qkv_format: str | None = None,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
        cu_seqlens_q_padded=None,
        cu_seqlens_kv_padded=None,
        max_seqlen_q=None,
        max_seqlen_kv=None,
        attn_mask_type: str | None = None,
        window_size=None,
        checkpoint_core_attention: bool = False,
        core_attention_bias_type: str = "no_bias",
        core_attention_bias: torch.Tensor | None = None,
        alibi_slopes=None,
        fast_zero_fill: bool = True,
        inference_params=None,
        pad_between_seqs=None,
        fp8_output: bool | None = False,
        num_splits: int | None = 1,
    ) -> torch.Tensor:
        qkv_format = self.qkv_format if qkv_format is None else qkv_format
        if qkv_format not in ("sbhd", "bshd", "thd"):
            raise NotImplementedError(f"qkv_format {qkv_format!r} is not emulated")
        if (qkv_format == "thd") != (cu_seqlens_q is not None):
            raise NotImplementedError("cu_seqlens are emulated with the thd format only")
        if inference_params is not None or alibi_slopes is not None:
            raise NotImplementedError("KV-cache inference and ALiBi are not emulated")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask_type = mask_type.replace(",", "_")
        self._check_window(window_size)
        if self.cp_size > 1 and qkv_format != "thd":
            raise NotImplementedError("context parallelism is emulated with the thd format only")
        if qkv_format == "thd":
            if core_attention_bias_type != "no_bias":
                raise NotImplementedError("attention bias with thd is not emulated")
            return self._thd(query_layer, key_layer, value_layer, mask_type, cu_seqlens_q,
                             cu_seqlens_kv, cu_seqlens_q_padded, cu_seqlens_kv_padded)
        if qkv_format == "sbhd":  # compute in [b, h, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        else:
            q, k, v = (t.permute(0, 2, 1, 3) for t in (query_layer, key_layer, value_layer))
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        if core_attention_bias_type == "post_scale_bias":
            scores = scores + core_attention_bias.float()
        elif core_attention_bias_type != "no_bias":
            raise NotImplementedError(f"{core_attention_bias_type} is not emulated")
        masked = self._mask(mask_type, attention_mask, scores.shape[-2], scores.shape[-1],
                            scores.device)
        if masked is not None:  # a finite fill, as TE's unfused softmax: no NaN on padded rows
            scores = scores.masked_fill(masked, -10000.0)
        probs = torch.softmax(scores, dim=-1)
        if masked is not None and "padding" in mask_type:
            probs = probs.masked_fill(masked, 0.0)
        probs = probs.to(q.dtype)
        if self.training and self.attention_dropout > 0:
            with self.attention_dropout_ctx():
                probs = torch.nn.functional.dropout(probs, p=self.attention_dropout)
        out = torch.matmul(probs, v)  # [b, h, sq, d]
        if qkv_format == "sbhd":
            out = out.permute(2, 0, 1, 3)
        else:
            out = out.permute(0, 2, 1, 3)
        return out.reshape(*out.shape[:2], -1)

    def _thd(self, query, key, value, mask_type, cu_q, cu_kv, cu_q_padded, cu_kv_padded):
        """[t, h, d] packed sequences -> [t, h * d]."""
        if mask_type not in ("padding", "padding_causal", "causal", "no_mask"):
            raise NotImplementedError(f"{mask_type} with thd is not emulated")

        q_seq, q_pos, q_valid = self._positions(cu_q, cu_q_padded, query.shape[0])
        if self.cp_size > 1:  # every rank's keys and values: the whole of each sequence
            key = _GatherOverCP.apply(key, self.cp_group)
            value = _GatherOverCP.apply(value, self.cp_group)
            rows = key.shape[0] // self.cp_size
            k_seq, k_pos, k_valid = (torch.cat(parts) for parts in zip(*(
                _thd_positions(cu_kv, cu_kv_padded, rows, rank, self.cp_size)
                for rank in range(self.cp_size)), strict=True))
        else:
            k_seq, k_pos, k_valid = self._positions(cu_kv, cu_kv_padded, key.shape[0])
        allowed = (q_seq[:, None] == k_seq[None, :]) & q_valid[:, None] & k_valid[None, :]
        if "causal" in mask_type:
            allowed &= k_pos[None, :] <= q_pos[:, None]
        q, k, v = (t.permute(1, 0, 2) for t in (query, key, value))  # [h, t, d]
        groups = q.shape[0] // k.shape[0]
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(~allowed.to(scores.device), -10000.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.to(scores.device), 0.0)
        probs = probs.to(q.dtype)
        if self.training and self.attention_dropout > 0:
            with self.attention_dropout_ctx():
                probs = torch.nn.functional.dropout(probs, p=self.attention_dropout)
        out = torch.matmul(probs, v).permute(1, 0, 2)  # [t, h, d]
        return out.reshape(out.shape[0], -1)

    def _positions(self, cu, cu_padded, total):
        rank = 0 if self.cp_size == 1 else dist.get_rank(self.cp_group)
        return _thd_positions(cu, cu_padded, total, rank, self.cp_size)

    @staticmethod
    def _mask(mask_type: str, attention_mask, sq: int, sk: int, device):
        if mask_type == "no_mask":
            return None
        masked = None
        if "causal" in mask_type:
            masked = _causal_mask(sq, sk, mask_type.endswith("bottom_right"), device)
        if "padding" in mask_type or mask_type == "arbitrary":
            if isinstance(attention_mask, (tuple, list)):  # (q mask, kv mask): [b, 1, 1, s]
                q_mask, kv_mask = attention_mask
                extra = q_mask.transpose(-1, -2) | kv_mask
            else:
                extra = attention_mask
            if extra is not None:
                masked = extra if masked is None else masked | extra
        return masked
