"""Deprecated location of Float8Tensor, still imported by megatron-core."""

from .tensor import Float8Tensor  # noqa: F401
