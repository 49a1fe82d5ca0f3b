"""Emulated Transformer Engine 2.11 (PyTorch only), running on CPU with plain torch ops.

Emulated with TE's signatures and semantics (see each module's docstring for TE source refs):
- `pytorch.Linear`, `pytorch.LayerNormLinear`: parallel_mode column/row/None, tp_group/tp_size,
  sequence parallel (column: all-gather the input along the sequence dim, reduce-scatter dgrad;
  row: reduce-scatter the output, all-gather the output grad), return_bias,
  return_layernorm_output(_gathered), LayerNorm/RMSNorm, zero_centered_gamma, params_dtype,
  init_method under the RNG tracker, device, fuse_wgrad_accumulation (main_grad), frozen weights
  (no wgrad), the parameter attributes megatron reads, `_extra_state`.
- `pytorch.LayerNorm`, `pytorch.RMSNorm`, `pytorch.DotProductAttention` (sbhd/bshd, causal /
  padding / no mask, GQA, dropout under the RNG tracker).
- `pytorch.GroupedLinear` (MoE experts): `weight{i}`/`bias{i}` per GEMM, the local shape of
  parallel_mode with no communication inside, `forward(inp, m_splits)` with zero-size splits,
  return_bias as a list, frozen weights (no wgrad), fuse_wgrad_accumulation, TE's attributes.
- FP8: `common.recipe` (Format, DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling, ...),
  `pytorch.quantization` (FP8GlobalStateManager, autocast, fp8_autocast, quantized_model_init)
  and the deprecated `pytorch.fp8` alias megatron imports. Inside an enabled autocast the base
  GEMM of Linear/LayerNormLinear is observably FP8: its input, weight and output-grad are
  rounded through torch.float8_e4m3fn (e5m2 for HYBRID grads) with a per-tensor current scale,
  whatever the recipe; the norm output returned by return_layernorm_output stays high precision.

DotProductAttention also takes THD (packed sequences with cu_seqlens, as slime's actor packs
its micro-batches), attending within each sequence.

Not emulated (constructing or calling them raises NotImplementedError, or the module is absent
so megatron falls back to its own path): FP8 primary weights (quantized_model_init /
--fp8-param-gather), delayed scaling's amax history, MXFP8/blockwise block scales, FP8
attention, Userbuffers comm overlap, delay_wgrad_compute, parameters_split, the `ops` fuser API
(TEFusedMLP, TE activation ops), TE checkpointing/CPU offload/CUDA graphs, fused RoPE, TE
optimizers and cross entropy, context parallelism, sliding windows, the C++ extension
`transformer_engine_torch`.
"""

from importlib import metadata

from . import (
    common,  # noqa: F401
    pytorch,  # noqa: F401
)

__version__ = str(metadata.version("transformer_engine"))
