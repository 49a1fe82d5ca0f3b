"""TE's operation-fuser API (`pytorch/ops/`): megatron-core names these classes in its TEFusedMLP
and TE activation-op definitions (the fused MLP, `use_te_activation_func`); not emulated."""

from ._not_emulated import not_emulated_class

_NAMES = ("FusibleOperation", "BasicOperation", "Sequential", "BasicLinear", "Linear", "Bias",
          "LayerNorm", "RMSNorm", "AllReduce", "ReduceScatter", "AllGather", "MakeExtraOutput",
          "GELU", "GEGLU", "ReLU", "ReGLU", "SiLU", "SwiGLU", "ScaledSwiGLU", "GroupedLinear")

globals().update({name: not_emulated_class(f"pytorch.ops.{name}", __import__("torch").nn.Module)
                  for name in _NAMES})
