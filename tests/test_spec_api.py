"""The spec API (`lora_spec`, `get_gpt_lora_spec`, slime's init hook) and bad input."""

import argparse
import re

import pytest
import torch

from lora_common import LoRAConfig, add_lora_arguments
from megatron_cpu.launch import run_on_ranks
from support import tiny_gpt
from support.compare import assert_same
from support.outcomes import assert_raised, outcome

CONFIG = LoRAConfig(r=4, alpha=8)


def megatron_config(**overrides):
    from megatron.core.transformer import TransformerConfig

    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=96, gated_linear_unit=True, normalization="RMSNorm",
                  add_bias_linear=False, use_cpu_initialization=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


def lora_args(*argv):
    parser = add_lora_arguments(argparse.ArgumentParser())
    parser.add_argument("--transformer-impl", default="local")
    parser.add_argument("--num-experts", type=int)
    parser.add_argument("--spec", nargs=2)
    return parser.parse_args(list(argv))


def linear_classes(spec):
    self_attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp
    mlp = mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules
    return [self_attention.linear_qkv, self_attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2]


def test_lora_spec_swaps_only_the_targets_and_the_layer():
    from megatron_lora import is_lora_linear, lora_spec

    spec = lora_spec(tiny_gpt.local_spec(), LoRAConfig(target_modules=["linear_qkv", "linear_fc2"]))
    qkv, proj, fc1, fc2 = linear_classes(spec)
    assert is_lora_linear(qkv) and is_lora_linear(fc2)
    assert not is_lora_linear(proj) and not is_lora_linear(fc1)
    assert spec.module.__name__ == "LoRATransformerLayer"
    assert qkv.__name__ == "LoRAColumnParallelLinear"


def test_lora_spec_is_idempotent_and_rejects_a_second_config():
    from megatron_lora import lora_spec

    once = lora_spec(tiny_gpt.local_spec(), CONFIG)
    twice = lora_spec(once, CONFIG)
    assert linear_classes(once) == linear_classes(twice) and once.module is twice.module
    with pytest.raises(ValueError, match=r"already carries LoRA of another config \(r: 4 -> 8; "
                                         r"alpha: 8.0 -> 32.0"):
        lora_spec(once, LoRAConfig(r=8))


def test_unknown_target_lists_the_linears_that_exist():
    from megatron_lora import lora_spec

    with pytest.raises(ValueError, match=r"\['linear_qkvv'\] match no submodule.*"
                                         r"\['linear_fc1', 'linear_fc2', "
                                         r"'linear_proj', 'linear_qkv'\]"):
        lora_spec(tiny_gpt.local_spec(), LoRAConfig(target_modules=["linear_qkvv"]))


def test_target_of_an_unsupported_class_is_named():
    from megatron_lora import lora_spec

    with pytest.raises(ValueError,
                       match=r"'self_attention.core_attention' is 'DotProductAttention'"):
        lora_spec(tiny_gpt.local_spec(), LoRAConfig(target_modules=["core_attention"]))


def test_get_gpt_lora_spec_reads_the_flags():
    from megatron_lora import get_gpt_lora_spec

    spec = get_gpt_lora_spec(lora_args("--lora-r", "2", "--lora-target-modules", "linear_fc1"),
                             megatron_config())
    qkv, _, fc1, _ = linear_classes(spec)
    assert fc1.lora_config == LoRAConfig(r=2, target_modules=("linear_fc1",))
    assert not hasattr(qkv, "lora_config")


def custom_base_spec(args, config, vp_stage):
    """A --lora-base-spec function, called like slime calls --spec functions."""
    spec = tiny_gpt.local_spec()
    spec.params["marker"] = (args.lora_r, config.hidden_size, vp_stage)
    return spec


def test_get_gpt_lora_spec_wraps_the_base_spec_flag():
    from megatron_lora import get_gpt_lora_spec

    args = lora_args("--lora-base-spec", "test_spec_api", "custom_base_spec")
    spec = get_gpt_lora_spec(args, megatron_config(), 3)
    assert spec.params["marker"] == (16, 64, 3)
    assert spec.module.__name__ == "LoRATransformerLayer"
    with pytest.raises(ValueError, match="--lora-base-spec no_such_module fn"):
        get_gpt_lora_spec(lora_args("--lora-base-spec", "no_such_module", "fn"), megatron_config())


def test_custom_megatron_init_points_slime_at_the_lora_spec():
    from megatron_lora import custom_megatron_init

    args = lora_args("--use-lora")
    custom_megatron_init(args)
    assert args.spec == ["megatron_lora", "get_gpt_lora_spec"]
    # slime trains the parameters whose names re.search one of these patterns
    (pattern,) = args.only_train_params_name_list
    names = ["module.decoder.layers.0.self_attention.linear_qkv.lora_A.weight",
             "module.decoder.layers.1.mlp.experts.linear_fc2.lora_B.weight3",
             "module.decoder.layers.0.self_attention.linear_qkv.weight",
             "module.decoder.layers.1.mlp.experts.linear_fc2.weight3",
             "module.decoder.layers.0.mlp.linear_fc1.lora_A.weight.main_grad",
             "module.decoder.layers.0.mlp.flora_B.weight"]
    assert [bool(re.search(pattern, n)) for n in names] == [True, True, False, False, False, False]

    args = lora_args("--use-lora", "--no-lora-only-trainable", "--spec", "pkg.mod", "fn")
    custom_megatron_init(args)
    assert args.lora_base_spec == ["pkg.mod", "fn"] and args.spec[0] == "megatron_lora"
    assert not hasattr(args, "only_train_params_name_list")

    untouched = lora_args()
    custom_megatron_init(untouched)
    assert untouched.spec is None

    with pytest.raises(ValueError, match="both --spec pkg.mod fn and --lora-base-spec"):
        custom_megatron_init(lora_args("--use-lora", "--spec", "pkg.mod", "fn",
                                       "--lora-base-spec", "a", "b"))


def dense_mtp_cases():
    """A dense model with an MTP layer (slime's MiMo-7B recipe, `--mtp-num-layers 1`), built as
    slime's model provider builds it: the `--spec` function's result handed to megatron-core's
    own `get_gpt_mtp_block_spec`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    from megatron_lora import get_gpt_lora_spec, lora_spec
    from support import lora_helpers

    config = tiny_gpt.transformer_config(mtp_num_layers=1)
    out = {}
    try:  # the plain LoRA layer spec: its class is a subclass of TransformerLayer
        get_gpt_mtp_block_spec(config, lora_spec(tiny_gpt.local_spec(), CONFIG),
                               use_transformer_engine=False)
    except ValueError as error:
        out["layer_spec_refused"] = str(error)[:40]

    def build(spec):
        torch.manual_seed(0)
        return GPTModel(config, spec, vocab_size=tiny_gpt.VOCAB,
                        max_sequence_length=tiny_gpt.SEQ, position_embedding_type="rope",
                        mtp_block_spec=get_gpt_mtp_block_spec(config, spec,
                                                              use_transformer_engine=False))

    plain = build(tiny_gpt.local_spec())
    lora = build(get_gpt_lora_spec(lora_args("--lora-r", "4", "--lora-alpha", "8"), config))
    out["names"] = (sorted(n for n, _ in plain.named_parameters()),
                    sorted(n for n, _ in lora.named_parameters()))
    out["plain_state"], out["lora_state"] = tiny_gpt.full_state(plain), tiny_gpt.full_state(lora)
    tokens, positions, labels = tiny_gpt.batch()  # the MTP layer's forward needs labels
    out["losses"] = [model(tokens, positions, None, labels=labels).detach()
                     for model in (plain, lora)]
    lora_helpers.set_nonzero_B(lora)
    tiny_gpt.loss(lora).backward()
    out["mtp_grads"] = {n: p.grad.abs().sum().item() for n, p in lora.named_parameters()
                        if n.startswith("mtp.") and ".lora_" in n}
    return out


def test_dense_mtp_model_gets_lora_through_megatrons_mtp_block_spec():
    """`get_gpt_lora_spec` hands a dense MTP model the decoder block form (megatron-core's
    `get_gpt_mtp_block_spec` refuses a layer spec whose class is not exactly TransformerLayer):
    B = 0 gives the plain model's per-token losses bit for bit, with its base names and
    weights, and the MTP layer's own adapters get grads from its loss."""
    out, = run_on_ranks(dense_mtp_cases, world_size=1)
    assert out["layer_spec_refused"].startswith("Invalid spec")
    plain_names, lora_names = out["names"]
    assert [n for n in lora_names if ".lora_" not in n] == plain_names
    lora_base = {n: t for n, t in out["lora_state"].items() if ".lora_" not in n}
    assert_same(lora_base, out["plain_state"], "base weights")
    assert_same(*out["losses"], "B = 0 per-token losses")
    assert len(out["mtp_grads"]) == 4 * 2  # qkv, proj, fc1, fc2 of the MTP layer: A and B
    assert all(grad > 0 for grad in out["mtp_grads"].values()), out["mtp_grads"]


def posthoc_cases():
    from megatron_lora import apply_lora_to_megatron_model, get_lora_parameters, lora_spec

    out = {}
    model = tiny_gpt.build_gpt()
    for name, targets in [("unknown", ["linear_qkvv"]), ("unsupported", ["word_embeddings"])]:
        out[name] = outcome(ValueError, apply_lora_to_megatron_model, model,
                            LoRAConfig(target_modules=targets))
    out["lora_after_errors"] = sorted(get_lora_parameters(model))

    apply_lora_to_megatron_model(model, CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    apply_lora_to_megatron_model(model, CONFIG)  # same config: a no-op
    after = model.state_dict()
    out["reapplied"] = ({k: after[k].clone() for k in before}, before)
    out["second_config"] = outcome(ValueError, apply_lora_to_megatron_model, model,
                                   LoRAConfig(r=8))
    out["trainable"] = (sorted(n for n, p in model.named_parameters() if p.requires_grad),
                        sorted(get_lora_parameters(model)))

    # Excluding one module by its path: both routes skip exactly that one.
    excluded = LoRAConfig(r=4, exclude_modules=["decoder.layers.1.mlp.linear_fc2"])
    spec_names = set(get_lora_parameters(
        tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), excluded))))
    posthoc_names = set(get_lora_parameters(
        apply_lora_to_megatron_model(tiny_gpt.build_gpt(), excluded)))
    out["excluded"] = (sorted(spec_names), sorted(posthoc_names))

    # MoE: --num-experts builds the MoE decoder block spec (local SequentialMLP experts),
    # every layer carries LoRA, and B = 0 is still the base model.
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_lora import get_gpt_lora_spec

    config = tiny_gpt.transformer_config(num_moe_experts=4, moe_router_topk=2)
    block = get_gpt_lora_spec(lora_args("--num-experts", "4", "--lora-r", "4", "--lora-alpha", "8"),
                              config)
    out["moe_layers"] = [layer.module.__name__ for layer in block.layer_specs]
    plain = tiny_gpt.build_gpt(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                               config=config)
    lora = tiny_gpt.build_gpt(block, config=config)
    plain_logits = tiny_gpt.logits(plain)
    out["moe_b0"] = (tiny_gpt.logits(lora), plain_logits)
    out["moe_expert_adapters"] = sum("local_experts" in n for n in get_lora_parameters(lora))
    return out


def test_posthoc_route_bad_input_idempotence_exclusion_and_moe():
    out, = run_on_ranks(posthoc_cases, world_size=1)
    assert_raised(out["unknown"], re.escape("['linear_qkvv'] match no module"))
    assert_raised(out["unknown"], re.escape("'linear_qkv'"))
    assert_raised(out["unsupported"],
                  re.escape("'embedding.word_embeddings' is a VocabParallelEmbedding"))
    assert out["lora_after_errors"] == []  # the refused calls left the model untouched
    assert_same(*out["reapplied"], "state after applying the same config again")
    assert_raised(out["second_config"], r"LoRA target 'decoder.layers.0.self_attention."
                                        r"linear_\w+': .* already carries LoRA of another config "
                                        r"\(r: 4 -> 8; alpha: 8.0 -> 32.0\)")
    trainable, lora = out["trainable"]
    assert trainable == lora
    spec_names, posthoc_names = out["excluded"]
    assert spec_names == posthoc_names
    assert len(spec_names) == 2 * 4 * 2 - 2
    assert [n for n in spec_names if "layers.1.mlp.linear_fc2" in n] == []
    assert out["moe_layers"] == ["LoRATransformerLayer"] * 2
    assert_same(*out["moe_b0"], "MoE logits with B = 0 vs the plain MoE model")
    assert out["moe_expert_adapters"] == 2 * 4 * 2 * 2  # layers x experts x (fc1, fc2) x (A, B)


def test_spec_flag_imports_the_entry_point():
    # Megatron and slime resolve `--spec MODULE NAME` with vars(module)[NAME].
    from megatron.core.transformer.spec_utils import import_module

    from megatron_lora import get_gpt_lora_spec

    assert import_module(("megatron_lora", "get_gpt_lora_spec")) is get_gpt_lora_spec
