"""Emulated `transformer_engine.pytorch` (TE v2.11 `pytorch/__init__.py`, the names megatron-core
uses). Absent on purpose, so megatron-core keeps its own code paths: `optimizers`, `graph`,
`cpu_offload`, `permutation`, `cross_entropy`, `cpp_extensions`, `attention.rope`."""

from . import distributed, ops, router  # noqa: F401
from .attention import DotProductAttention  # noqa: F401
from .distributed import CudaRNGStatesTracker, checkpoint  # noqa: F401
from .module import (  # noqa: F401
    GroupedLinear,
    LayerNorm,
    LayerNormLinear,
    Linear,
    RMSNorm,
)
from .quantization import (  # noqa: F401
    autocast,
    fp8_autocast,
    fp8_model_init,
    get_default_recipe,
    is_fp8_available,
    is_fp8_block_scaling_available,
    is_mxfp8_available,
    is_nvfp4_available,
    quantized_model_init,
)
from .tensor import Float8Tensor, MXFP8Tensor, QuantizedTensor  # noqa: F401
from .utils import get_cudnn_version, get_device_compute_capability, is_bf16_available  # noqa
