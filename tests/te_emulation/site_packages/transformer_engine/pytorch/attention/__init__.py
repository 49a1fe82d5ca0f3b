"""Attention (TE v2.11 `pytorch/attention/`): only DotProductAttention is emulated; RoPE and
`_SplitAlongDim` are absent, so megatron-core uses its own implementations of those."""

from .dot_product_attention import DotProductAttention  # noqa: F401
