"""LoRA on megatron-core's Transformer Engine wrappers: the same adapter, sharding rule and
merge as the local linears (`parallel_linear.py`), wired to the TE wrappers' forward
signatures. `registry.py` picks these mixins when megatron-core found TE at import."""

from __future__ import annotations

from megatron_lora.layers.parallel_linear import LoRAParallelLinear
from megatron_lora.layers.sharding import COLUMN, DUPLICATED, ROW


class LoRATEColumnParallelMixin(LoRAParallelLinear):
    """LoRA for megatron-core's `TEColumnParallelLinear` (Transformer Engine)."""

    lora_split = COLUMN

    def forward(self, x):
        output, bias = super().forward(x)
        if not self.lora_active:
            return output, bias
        return self.lora_output(output, x), bias


class LoRATERowParallelMixin(LoRAParallelLinear):
    """LoRA for megatron-core's `TERowParallelLinear` (input always parallel)."""

    lora_split = ROW

    def forward(self, x):
        output, bias = super().forward(x)
        if not self.lora_active:
            return output, bias
        return self.lora_output(output, x), bias


class LoRATELayerNormColumnParallelMixin(LoRAParallelLinear):
    """LoRA for megatron-core's `TELayerNormColumnParallelLinear`, whose norm is fused into
    the linear: the adapter must see the *normalized* input, which TE hands back when
    `return_layernorm_output` is on.

    TE returns that output in the activation's high precision even under FP8 autocast, and
    adds the gradient flowing into it to the input gradient before the norm backward (after
    its own TP reduction; under SP it is this rank's sequence shard, which is what the column
    rule wants). The `..._gathered` variant drops that gradient in TE >= 2.4, so it stays off.
    See docs/te_notes.md.
    """

    lora_split = COLUMN

    def forward(self, x):
        # Ask TE for the norm output only when the adapter runs (merged or disabled: the base
        # forward, with no extra output and, under FP8, no extra quantization).
        self.return_layernorm_output = self.lora_active
        self.return_layernorm_output_gathered = False
        result = super().forward(x)
        if not self.return_layernorm_output:
            return result
        if self.te_return_bias:
            output, bias, normalized = result
        else:
            (output, normalized), bias = result
        return self.lora_output(output, normalized), bias

    def remove_lora(self) -> None:
        self.return_layernorm_output = False
        super().remove_lora()


class LoRATEDuplicatedMixin(LoRAParallelLinear):
    """LoRA for megatron-core's plain `TELinear` built with `parallel_mode="duplicated"` (MLA's
    `linear_q_down_proj` and `linear_kv_down_proj` on the TE spec): the weight is whole on every
    TP rank and TE runs it with no communication (TE's own parallel mode is None, its tp_size 1).

    The adapter is whole too, with no collective. Under sequence parallelism the input is this
    rank's sequence shard, so both matrices' grads are partial sums: both are marked
    `sequence_parallel`, as Megatron marks the base weight. TE switches its own
    `sequence_parallel` off at tp_size 1, so the config's flag is the one that says so."""

    lora_split = DUPLICATED

    def add_lora(self, stride: int | None = None) -> None:
        if self.parallel_mode is not None:
            raise NotImplementedError(
                f"LoRA on a plain TELinear supports parallel_mode='duplicated' (TE's None) only; "
                f"{type(self).__name__} has TE parallel mode {self.parallel_mode!r}: build it as "
                f"TEColumnParallelLinear or TERowParallelLinear")
        super().add_lora(stride)

    @property
    def lora_sequence_parallel(self) -> bool:
        return bool(self.config.sequence_parallel)

    def forward(self, x):
        output, bias = super().forward(x)
        if not self.lora_active:
            return output, bias
        return self.lora_output(output, x), bias
