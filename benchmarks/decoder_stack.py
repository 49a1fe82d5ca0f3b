"""The model every Megatron benchmark times: a Megatron-core `TransformerBlock` (a stack of GPT
decoder layers, local spec: RMSNorm, GQA attention, SwiGLU MLP, no bias) and its training step
in three variants on the same base weights:

    full    every weight trainable, Adam on all of them (weight-grad GEMMs included)
    lora    LoRA (spec route) on linear_qkv/proj/fc1/fc2, base frozen, Adam on the adapters
    frozen  nothing trainable: forward plus backward to the input only, no optimizer

Why a decoder block and not a whole GPTModel: the layers are what LoRA changes. The embedding
and the vocabulary projection are not LoRA targets; they would add a vocabulary-dependent
constant to every variant and hide the per-layer ratios the theory predicts. RoPE is left out
too (elementwise, the same in every variant). The input requires grad in every variant, so the
backward graphs differ only in the weight grads.

No CPU shim is needed here: the caller sets up Megatron (benchmarks.common.run_layout; on CPU
that enables megatron_cpu.device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

VARIANTS = ("frozen", "full", "lora")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Model and batch shape. Heads of 64 channels; query groups = heads / 2 (GQA)."""

    hidden: int
    layers: int = 2
    seq: int = 256
    batch: int = 2
    ffn_multiple: int = 4  # ffn = 4 x hidden, gated (SwiGLU): fc1 outputs 2 x ffn

    @property
    def ffn(self) -> int:
        return self.ffn_multiple * self.hidden

    @property
    def heads(self) -> int:
        return max(2, self.hidden // 64)

    @property
    def groups(self) -> int:
        return max(1, self.heads // 2)

    @property
    def kv_channels(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def linears(self) -> dict[str, tuple[int, int, str]]:
        """Full (unsharded) `(in, out, split kind)` of each LoRA target in one layer."""
        h, kv = self.hidden, self.kv_channels
        return {
            "linear_qkv": (h, (self.heads + 2 * self.groups) * kv, "column"),
            "linear_proj": (self.heads * kv, h, "row"),
            "linear_fc1": (h, 2 * self.ffn, "column"),
            "linear_fc2": (self.ffn, h, "row"),
        }

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, ffn {self.ffn} (SwiGLU), "
                f"{self.heads} heads / {self.groups} groups, seq {self.seq} x batch {self.batch}")


def transformer_config(geometry: Geometry, *, tp: int, sp: bool, dtype: torch.dtype,
                       device: str):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=geometry.layers, hidden_size=geometry.hidden,
        num_attention_heads=geometry.heads, num_query_groups=geometry.groups,
        kv_channels=geometry.kv_channels, ffn_hidden_size=geometry.ffn, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # CPU: weights built on the CPU from the global seed (the same for every variant).
        use_cpu_initialization=device == "cpu",
        tensor_model_parallel_size=tp, sequence_parallel=sp and tp > 1,
    )


def build_block(geometry: Geometry, variant: str, *, r: int = 16, tp: int = 1, sp: bool = False,
                dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """The decoder block of `variant`, with `requires_grad` set as that variant trains."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from lora_common import LoRAConfig
    from megatron_lora import lora_spec, mark_only_lora_as_trainable

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config = transformer_config(geometry, tp=tp, sp=sp, dtype=dtype, device=device)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if variant == "lora":
        spec = lora_spec(spec, LoRAConfig(r=r, alpha=2 * r))  # freezes the base
    torch.manual_seed(seed)
    # The whole block in `dtype`, norms included, as Megatron's Float16Module casts a bf16 model.
    block = TransformerBlock(config, spec).to(device=device, dtype=dtype)
    if variant == "lora":
        mark_only_lora_as_trainable(block)  # the final norm is outside every layer
    else:
        block.requires_grad_(variant == "full")
    return block


def sequence_parallel_grads(block) -> list[torch.nn.Parameter]:
    """Trainable parameters whose grad is partial per sequence shard (norms under SP, and the
    replicated LoRA matrix of each target): Megatron's grad finalization all-reduces them."""
    return [p for p in block.parameters()
            if p.requires_grad and getattr(p, "sequence_parallel", False)]


def allreduce_sequence_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    """What `finalize_model_grads` does for them: one coalesced all-reduce over TP."""
    from megatron.core import parallel_state
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=False):
        grad.copy_(reduced)


def make_optimizer(block) -> torch.optim.Optimizer | None:
    """Adam on the trainable parameters (fused where torch has it, as Megatron's FusedAdam)."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return None
    try:
        return torch.optim.Adam(params, lr=1e-5, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=1e-5)


def training_step(block, geometry: Geometry, *, tp: int = 1, sp: bool = False,
                  seed: int = 1) -> Callable[[], None]:
    """A callable running one step: forward, backward (from a fixed output grad), the grad
    all-reduce of sequence-parallel parameters, and Adam where something is trainable."""
    param = next(block.parameters())
    seq = geometry.seq // tp if sp and tp > 1 else geometry.seq  # SP: this rank's shard
    generator = torch.Generator().manual_seed(seed)
    shape = (seq, geometry.batch, geometry.hidden)
    x = torch.randn(shape, generator=generator).to(param.device, param.dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(param.device, param.dtype) * 0.01
    optimizer = make_optimizer(block)
    sp_params = sequence_parallel_grads(block) if sp and tp > 1 else []

    def step() -> None:
        x.grad = None
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        block(x, attention_mask=None).backward(dy)
        allreduce_sequence_parallel_grads(sp_params)
        if optimizer is not None:
            optimizer.step()

    return step


def trainable_parameters(block) -> int:
    return sum(p.numel() for p in block.parameters() if p.requires_grad)
