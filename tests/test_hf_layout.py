"""`megatron_lora.interop.hf_mapping` against real transformers and megatron-core: the name
mapping names real modules, the fused layouts are the ones Megatron computes with, and a
Megatron GPTModel converted through them computes the HF model's logits at TP=1, TP=2 and
TP=2 with SP."""

import re

import pytest
import torch

from lora_common import HF_TARGET_MODULES, MEGATRON_TARGET_MODULES
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from megatron_lora.interop import architectures, hf_mapping, hf_params
from megatron_lora.interop.geometry import Geometry
from megatron_lora.interop.hf_mapping import fuse_fc1, fuse_qkv, split_fc1, split_qkv
from megatron_lora.layers.sharding import shard
from support import hf_llama
from support.compare import assert_same
from support.outcomes import assert_raised, outcome

# --- layouts on plain tensors ----------------------------------------------------------------


def labelled_rows(labels):
    """A [rows, 1] tensor whose row values encode the labels, for readable layout checks."""
    return torch.tensor([[float(x)] for x in labels])


def test_split_qkv_reads_megatron_per_group_interleave():
    # 4 heads in 2 groups, 1 channel per head: q heads 0-3 = 10..13, k groups 20,21, v 30,31.
    # Megatron's fused rows: [q0 q1 k0 v0 | q2 q3 k1 v1].
    fused = labelled_rows([10, 11, 20, 30, 12, 13, 21, 31])
    q, k, v = split_qkv(fused, num_heads=4, num_query_groups=2, kv_channels=1)
    assert q.flatten().tolist() == [10, 11, 12, 13]
    assert k.flatten().tolist() == [20, 21]
    assert v.flatten().tolist() == [30, 31]


@pytest.mark.parametrize("heads, groups, kv_channels", [(4, 2, 3), (4, 4, 2), (6, 1, 2), (8, 2, 5)])
@pytest.mark.parametrize("trailing", [(), (7,), (3,)], ids=["bias", "weight", "lora_B"])
def test_split_and_fuse_qkv_invert_each_other(heads, groups, kv_channels, trailing):
    rows = (heads + 2 * groups) * kv_channels
    fused = torch.randn(rows, *trailing)
    q, k, v = split_qkv(fused, heads, groups, kv_channels)
    assert q.shape == (heads * kv_channels, *trailing)
    assert k.shape == v.shape == (groups * kv_channels, *trailing)
    assert_same(fuse_qkv(q, k, v, heads, groups, kv_channels), fused, "fuse_qkv(split_qkv(x))")


def test_split_fc1_is_gate_then_up_and_shards_as_megatron_stores_it():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = fuse_fc1(gate, up)
    assert_same(list(split_fc1(fused)), [gate, up], "split_fc1(fuse_fc1(gate, up))")
    # Megatron's stride-2 split leaves each rank [gate_i; up_i].
    for rank in range(2):
        expected = torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]])
        assert_same(shard(fused, 0, rank, 2, stride=2), expected, f"rank {rank} shard")


def test_layout_errors_name_the_culprit():
    with pytest.raises(ValueError,
                       match=r"split_qkv fused tensor: expected 24 rows .* got shape \(20, 3\)"):
        split_qkv(torch.zeros(20, 3), 4, 2, 3)
    with pytest.raises(ValueError, match="5 heads do not divide into 2 groups"):
        split_qkv(torch.zeros(27), 5, 2, 3)
    with pytest.raises(ValueError, match=r"fuse_qkv k: expected 6 rows"):
        fuse_qkv(torch.zeros(12, 2), torch.zeros(3, 2), torch.zeros(6, 2), 4, 2, 3)
    with pytest.raises(ValueError, match="even number of rows"):
        split_fc1(torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"gate \(2, 3\) and up \(3, 3\) differ"):
        fuse_fc1(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="expected 3 tensors .q_proj, k_proj, v_proj., got 2"):
        hf_mapping.fuse_target("linear_qkv", [torch.zeros(1)] * 2, Geometry(1, 8, 2, 1, 4, 8))


def test_split_target_routes_each_megatron_target():
    geometry = Geometry(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2,
                        kv_channels=2, ffn_hidden_size=6)
    for target, rows in [("linear_qkv", geometry.qkv_rows), ("linear_fc1", geometry.fc1_rows),
                         ("linear_proj", 8), ("linear_fc2", 8)]:
        fused = torch.randn(rows, 3)
        parts = hf_mapping.split_target(target, fused, geometry)
        assert len(parts) == len(hf_mapping.hf_leaves(target))
        assert_same(hf_mapping.fuse_target(target, parts, geometry), fused, target)
    with pytest.raises(ValueError, match="non-gated MLP"):
        hf_mapping.split_target("linear_fc1", torch.zeros(6, 3),
                               Geometry(1, 8, 4, 2, 2, 6, gated_linear_unit=False))


# --- names and architectures -----------------------------------------------------------------


def test_unknown_architecture_is_named_with_the_known_ones():
    from transformers import GPT2Config

    known = ("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
             "Qwen3MoeForCausalLM, MixtralForCausalLM, DeepseekV3ForCausalLM$")
    with pytest.raises(ValueError, match=f"unknown architecture GPT2LMHeadModel; .* knows {known}"):
        architectures.architecture("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="unknown architecture model_type 'gpt2'"):
        architectures.architecture(GPT2Config())
    with pytest.raises(ValueError, match="unknown architecture GPT2LMHeadModel"):
        Geometry.from_hf(type("Config", (), {"architectures": ["GPT2LMHeadModel"]})())


@pytest.mark.parametrize("model_type", list(hf_llama.VARIANTS))
def test_mapping_names_the_real_hf_modules_and_their_extras(model_type):
    model = hf_llama.build_hf_model(hf_llama.hf_config(model_type))
    arch = architectures.architecture(model.config)
    assert type(model).__name__ == arch.name
    attention = model.model.layers[0].self_attn
    assert arch.qkv_bias == (attention.q_proj.bias is not None)
    assert arch.qk_norm == hasattr(attention, "q_norm")
    # The four targets name exactly the Linear modules of the decoder layers.
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    mapped = {n for layer in range(model.config.num_hidden_layers)
              for target in MEGATRON_TARGET_MODULES
              for n in hf_mapping.hf_module_names(layer, target)}
    assert mapped == linears
    for name in linears:
        layer, leaf = hf_mapping.parse_hf_module("base_model.model." + name)
        assert name in hf_mapping.hf_module_names(layer, hf_mapping.megatron_target(leaf))


def test_target_module_names_round_trip():
    assert hf_mapping.hf_target_modules(MEGATRON_TARGET_MODULES) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # HF order
    assert sorted(hf_mapping.hf_target_modules(MEGATRON_TARGET_MODULES)) == list(HF_TARGET_MODULES)
    assert hf_mapping.hf_target_modules(["linear_fc2", "linear_qkv"]) == [
        "q_proj", "k_proj", "v_proj", "down_proj"]
    assert ({hf_mapping.megatron_target(leaf) for leaf in HF_TARGET_MODULES}
            == set(MEGATRON_TARGET_MODULES))
    for target in MEGATRON_TARGET_MODULES:
        name = "module.module." + hf_mapping.megatron_module_name(3, target)
        assert hf_mapping.parse_megatron_module(name) == (3, target)
    with pytest.raises(ValueError, match="'decoder.layers.0.mlp.linear_fc3' is not a Megatron"):
        hf_mapping.parse_megatron_module("decoder.layers.0.mlp.linear_fc3")
    with pytest.raises(ValueError, match="unknown HF LoRA target 'qkv_proj'"):
        hf_mapping.megatron_target("qkv_proj")
    with pytest.raises(ValueError, match="unknown Megatron LoRA target 'q_proj'"):
        hf_mapping.hf_target_modules(["q_proj"])


def test_te_spec_fused_norm_names_map_like_the_local_spec_norms():
    pairs = [("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
             ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")]
    for te_name, local_name in pairs:
        te = hf_params.hf_param(f"module.decoder.layers.1.{te_name}")
        assert te == hf_params.hf_param(f"decoder.layers.1.{local_name}")
    assert hf_params.hf_param("decoder.layers.1.mlp.linear_fc1.layer_norm_weight").hf_names == (
        "model.layers.1.post_attention_layernorm.weight",)
    qkv_bias = hf_params.hf_param("decoder.layers.0.self_attention.linear_qkv.bias")
    assert qkv_bias.target == "linear_qkv"
    assert qkv_bias.hf_names[2] == "model.layers.0.self_attn.v_proj.bias"
    with pytest.raises(ValueError, match="no HF Llama-family counterpart for Megatron parameter "
                                         "'decoder.layers.0.self_attention.linear_qkv._extra_state'"):
        hf_params.hf_param("decoder.layers.0.self_attention.linear_qkv._extra_state")


def test_geometry_round_trips_and_rejects_bad_headers():
    geometry = Geometry.from_hf(hf_llama.hf_config("qwen3"))
    assert geometry == Geometry(num_layers=2, hidden_size=64, num_attention_heads=4,
                                num_query_groups=2, kv_channels=32, ffn_hidden_size=96)
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    assert Geometry.from_hf(hf_llama.hf_config("qwen2")).kv_channels == 16  # no head_dim: 64 / 4
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\], "
                                         r"missing field\(s\) \['num_attention_heads'\]"):
        Geometry.from_dict({**{k: v for k, v in geometry.to_dict().items()
                               if k != "num_attention_heads"}, "heads": 4})
    with pytest.raises(ValueError,
                       match="num_attention_heads 4 is not a multiple of num_query_groups 3"):
        Geometry(2, 64, 4, 3, 16, 96)
    with pytest.raises(ValueError, match="Geometry.kv_channels must be a positive int, got 0"):
        Geometry(2, 64, 4, 2, 0, 96)
    other = Geometry(2, 64, 4, 1, 32, 96)
    with pytest.raises(ValueError, match="num_query_groups: 2 vs 1 in adapter header"):
        geometry.require_equal(other, "adapter header")


# --- the oracle: converted Megatron GPTModel vs the HF model ---------------------------------


def per_head_qkv_of_both(hf_model, gpt):
    """Layer 0's q, k, v per head from HF's projections and from Megatron's own
    `get_query_key_value_tensors` on this rank's fused shard; HF's sliced to this rank's heads."""
    from megatron.core import parallel_state

    config = hf_model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = Geometry.from_hf(config).kv_channels
    rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    x = torch.randn(hf_llama.SEQ, hf_llama.BATCH, config.hidden_size,
                    generator=torch.Generator().manual_seed(7))
    attention = hf_model.model.layers[0].self_attn
    with torch.no_grad():
        ours = gpt.decoder.layers[0].self_attention.get_query_key_value_tensors(x)
        theirs = [proj(x).view(*x.shape[:2], -1, head_dim)
                  for proj in (attention.q_proj, attention.k_proj, attention.v_proj)]
    q_heads = slice(rank * heads // tp, (rank + 1) * heads // tp)
    # Megatron hands every rank whole kv groups; with fewer groups than ranks, ranks share one.
    kv = (slice(rank * groups // tp, (rank + 1) * groups // tp) if groups >= tp
          else slice(rank // (tp // groups), rank // (tp // groups) + 1))
    expected = (theirs[0][:, :, q_heads], theirs[1][:, :, kv], theirs[2][:, :, kv])
    return list(zip(ours, expected, strict=True))


def naive_qkv_logits(hf_model, input_ids):
    """Logits of a conversion that fuses q/k/v as plain [q; k; v] (the NeMo 2 mistake)."""
    gpt = hf_llama.gpt_from_hf(hf_model)
    with torch.no_grad():
        for layer, attention in zip(gpt.decoder.layers, hf_model.model.layers, strict=True):
            projections = (attention.self_attn.q_proj, attention.self_attn.k_proj,
                           attention.self_attn.v_proj)
            layer.self_attention.linear_qkv.weight.copy_(torch.cat([p.weight for p in projections]))
    return hf_llama.gpt_logits(gpt, input_ids)


def conversions_at_every_layout():
    """On each of 2 ranks, for TP=2, TP=2+SP and TP=1 (2 data-parallel replicas): per variant,
    HF and converted-Megatron logits and layer-0 q/k/v; plus the checks that need a model."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    out = {"logits": {}, "qkv": {}}
    input_ids = hf_llama.tokens()
    hf_models = {mt: hf_llama.build_hf_model(hf_llama.hf_config(mt)) for mt in hf_llama.VARIANTS}
    for tp, sp in [(2, False), (2, True), (1, False)]:
        initialize_model_parallel(tp=tp)
        for model_type, hf_model in hf_models.items():
            gpt = hf_llama.gpt_from_hf(hf_model, sequence_parallel=sp)
            out["logits"][model_type, tp, sp] = (hf_llama.hf_logits(hf_model, input_ids),
                                                 hf_llama.gpt_logits(gpt, input_ids))
            if not sp and not architectures.architecture(hf_model.config).qk_norm:
                out["qkv"][model_type, tp] = per_head_qkv_of_both(hf_model, gpt)

    llama = hf_models["llama"]
    gpt = hf_llama.gpt_from_hf(llama)  # TP=1 from here on
    out["naive_qkv"] = (hf_llama.hf_logits(llama, input_ids), naive_qkv_logits(llama, input_ids))
    out["geometry"] = (Geometry.from_megatron(gpt.config), Geometry.from_hf(llama.config))
    out["megatron_decoder_linears"] = {
        name for name, module in gpt.named_modules()
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        and name.startswith("decoder.")}
    # A LoRA parameter beside the base weights is left alone.
    qkv = gpt.decoder.layers[0].self_attention.linear_qkv
    qkv.lora_A = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(qkv.lora_A.weight, 3.0)
    hf_llama.load_hf_state(gpt, llama.state_dict())
    out["lora_param_after_load"] = qkv.lora_A.weight.item()
    del qkv.lora_A
    extra = {**llama.state_dict(), "model.extra.weight": torch.zeros(1)}
    missing = {k: v for k, v in llama.state_dict().items() if "up_proj" not in k}
    out["load_errors"] = [outcome((KeyError, ValueError), hf_llama.load_hf_state, gpt, bad_state)
                          for bad_state in (extra, missing)]
    return out


@pytest.fixture(scope="module")
def conversions():
    return run_on_ranks(conversions_at_every_layout, world_size=2, timeout=300)


@pytest.mark.parametrize("model_type", list(hf_llama.VARIANTS))
@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True)],
                         ids=["tp1", "tp2", "tp2-sp"])
def test_converted_gpt_logits_equal_hf_logits(conversions, model_type, tp, sp):
    for rank in conversions:
        expected, actual = rank["logits"][model_type, tp, sp]
        assert expected.shape == (hf_llama.BATCH, hf_llama.SEQ, hf_llama.VOCAB)
        assert expected.abs().max() > 1.0  # not a degenerate model
        hf_llama.assert_logits_close(actual, expected)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_splits_fused_qkv_into_hf_heads(conversions, model_type, tp):
    for rank in conversions:
        for ours, theirs in rank["qkv"][model_type, tp]:
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_plain_qkv_concatenation_would_be_wrong(conversions):
    expected, naive = conversions[0]["naive_qkv"]
    assert (expected - naive).abs().max() > 0.1


def test_geometry_and_module_names_agree_with_the_built_gpt(conversions):
    from_megatron, from_hf = conversions[0]["geometry"]
    assert from_megatron == from_hf
    # The four targets name exactly the linears of Megatron's decoder layers.
    assert conversions[0]["megatron_decoder_linears"] == {
        hf_mapping.megatron_module_name(layer, target)
        for layer in range(2) for target in MEGATRON_TARGET_MODULES}


def test_loading_uses_every_hf_tensor_and_fills_every_parameter(conversions):
    assert conversions[0]["lora_param_after_load"] == 3.0
    extra, missing = conversions[0]["load_errors"]
    assert_raised(extra, re.escape("HF tensors with no Megatron parameter: ['model.extra.weight']"))
    assert_raised(missing, re.escape("lacks ['model.layers.0.mlp.up_proj.weight'] for Megatron "
                                     "parameter 'decoder.layers.0.mlp.linear_fc1.weight'"))
