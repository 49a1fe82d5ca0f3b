"""TE's quantized tensor classes. megatron-core imports them to recognise FP8 parameters
(`fp8_utils.is_float8tensor`); the emulation never creates one (FP8 primary weights are not
emulated), so they exist for `isinstance` checks only."""

import torch

from .._not_emulated import not_emulated_class

QuantizedTensor = not_emulated_class("pytorch.tensor.QuantizedTensor", torch.Tensor)
Float8Tensor = not_emulated_class("pytorch.tensor.Float8Tensor", QuantizedTensor)
MXFP8Tensor = not_emulated_class("pytorch.tensor.MXFP8Tensor", QuantizedTensor)
Float8BlockwiseQTensor = not_emulated_class("pytorch.tensor.Float8BlockwiseQTensor",
                                            QuantizedTensor)
