"""Pipeline parallelism: the same adapters at every PP size, and adapter checkpoints that cross
PP sizes (each stage holds different layers; rank 0 gathers them all)."""

import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, tiny_gpt
from support.compare import assert_same

CONFIG = LoRAConfig(r=4, alpha=8)


def stage_model(pp_rank: int, pp: int, **overrides):
    from megatron.core.models.gpt import GPTModel

    from megatron_lora import lora_spec

    config = tiny_gpt.transformer_config(num_layers=4, pipeline_dtype=torch.float32, **overrides)
    torch.manual_seed(0)
    return GPTModel(config, lora_spec(tiny_gpt.local_spec(), CONFIG), vocab_size=tiny_gpt.VOCAB,
                    max_sequence_length=tiny_gpt.SEQ, position_embedding_type="rope",
                    pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)


def canonical_state(model):
    from megatron_lora.modules import lora_modules

    return {f"{name}.{m}": getattr(module, m).weight.detach().clone()
            for name, module in lora_modules(model).items() for m in ("lora_A", "lora_B")}


def pp_cases(path):
    from megatron.core import parallel_state

    from megatron_lora import load_lora_checkpoint, save_lora_checkpoint

    initialize_model_parallel(tp=1, pp=2)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = stage_model(stage, 2)
    layer_numbers = sorted(layer.layer_number for layer in model.decoder.layers)
    lora_helpers.set_nonzero_B(model, seed=stage)
    trained = canonical_state(model)
    save_lora_checkpoint(model, path)

    initialize_model_parallel(tp=1, pp=1)
    whole = stage_model(0, 1)
    init = canonical_state(whole)
    load_lora_checkpoint(whole, path)
    return {"layer_numbers": layer_numbers, "trained": trained, "init": init,
            "loaded": canonical_state(whole)}


def test_adapters_agree_across_pipeline_sizes(tmp_path):
    ranks = run_on_ranks(pp_cases, world_size=2, args=(str(tmp_path / "adapter.safetensors"),))
    assert ranks[0]["layer_numbers"] == [1, 2] and ranks[1]["layer_numbers"] == [3, 4]
    init = ranks[0]["init"]
    assert len(init) == 4 * 4 * 2
    for rank in ranks:
        # Each stage's A, drawn from (seed, global layer number, name), is the PP=1 model's A.
        for name, value in rank["trained"].items():
            if "lora_A" in name:
                assert_same(value, init[name], name)
        # The PP=2 checkpoint loads at PP=1 with every stage's tensors.
        for name, value in rank["trained"].items():
            assert_same(ranks[0]["loaded"][name], value, name)
    assert set(ranks[0]["trained"]) | set(ranks[1]["trained"]) == set(init)
