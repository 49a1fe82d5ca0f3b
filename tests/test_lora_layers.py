"""LoRA layers in Megatron specs: B = 0 is the base model, both routes build the same model,
the init does not depend on TP, and the parameter attributes and count are right."""

import pytest

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, tiny_gpt
from support.compare import assert_same

CONFIG = LoRAConfig(r=4, alpha=8)
LAYOUTS = [(2, True), (2, False), (1, False)]


def build_and_compare():
    from megatron_lora import apply_lora_to_megatron_model, get_lora_parameters, lora_spec

    out = {}
    for tp, sp in LAYOUTS:
        initialize_model_parallel(tp=tp)
        plain = tiny_gpt.build_gpt(sequence_parallel=sp)
        spec_model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG),
                                        sequence_parallel=sp)
        posthoc = apply_lora_to_megatron_model(tiny_gpt.build_gpt(sequence_parallel=sp), CONFIG)
        plain_state, spec_state = tiny_gpt.full_state(plain), tiny_gpt.full_state(spec_model)
        lora = get_lora_parameters(spec_model)
        plain_logits = tiny_gpt.logits(plain)
        out[(tp, sp)] = dict(
            b0_logits=(tiny_gpt.logits(spec_model), plain_logits),
            plain_state=plain_state,
            spec_state=spec_state,  # this rank's parameters, as built (nothing gathered)
            extra_names=sorted(set(spec_state) - set(plain_state)),
            posthoc_state=tiny_gpt.full_state(posthoc),
            lora_full=lora_helpers.full_state(lora),
            attributes={name: (p.tensor_model_parallel, p.partition_dim,
                               p.partition_stride, getattr(p, "sequence_parallel", False))
                        for name, p in lora.items()},
            trainable_local=sum(p.numel() for p in posthoc.parameters() if p.requires_grad),
            trainable_base_in_layers=[n for n, p in spec_model.named_parameters()
                                      if ".layers." in n and ".lora_" not in n and p.requires_grad],
        )
    return out


@pytest.fixture(scope="module")
def built():
    return run_on_ranks(build_and_compare, world_size=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_b_zero_is_the_base_model_bit_for_bit(built, layout):
    for rank in built:
        r = rank[layout]
        assert_same(*r["b0_logits"], "logits with B = 0 vs the plain model")
        plain, spec = r["plain_state"], r["spec_state"]
        assert set(plain) <= set(spec)  # the base names are kept
        for name, value in plain.items():  # the global RNG stream was not consumed
            assert_same(spec[name], value, name)


def test_only_lora_names_are_added(built):
    extra = built[0][(1, False)]["extra_names"]
    assert len(extra) == 2 * 4 * 2  # layers x targets x (A, B)
    assert [n for n in extra if not n.endswith((".lora_A.weight", ".lora_B.weight"))] == []
    assert "decoder.layers.1.mlp.linear_fc1.lora_B.weight" in extra


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spec_route_equals_posthoc_route(built, layout):
    for rank in built:
        spec, posthoc = rank[layout]["spec_state"], rank[layout]["posthoc_state"]
        # same names in the same order with the same shapes, then the same values
        assert [(k, v.shape) for k, v in spec.items()] == [(k, v.shape) for k, v in posthoc.items()]
        assert_same(posthoc, spec, "post-hoc route vs spec route")


def test_lora_init_is_independent_of_tp(built):
    reference = built[0][(1, False)]["lora_full"]
    for layout in LAYOUTS:
        for rank in built:
            got = rank[layout]["lora_full"]
            assert got.keys() == reference.keys()
            for name, value in reference.items():
                assert_same(got[name], value, f"{layout} {name}")
    # no two adapters share an A
    a_values = [v for n, v in reference.items() if "lora_A" in n]
    assert len({tuple(v.flatten()[:8].tolist()) for v in a_values}) == len(a_values)
    assert [n for n, v in reference.items() if "lora_B" in n and v.any()] == []  # B = 0


def test_parameter_attributes_follow_the_sharding_rule(built):
    attrs = built[0][(2, True)]["attributes"]
    layer = "decoder.layers.0."
    assert attrs[layer + "self_attention.linear_qkv.lora_A.weight"] == (False, -1, 1, True)
    assert attrs[layer + "self_attention.linear_qkv.lora_B.weight"] == (True, 0, 1, False)
    assert attrs[layer + "mlp.linear_fc1.lora_B.weight"] == (True, 0, 2, False)  # SwiGLU stride
    assert attrs[layer + "self_attention.linear_proj.lora_A.weight"] == (True, 1, 1, False)
    assert attrs[layer + "self_attention.linear_proj.lora_B.weight"] == (False, -1, 1, True)
    assert attrs[layer + "mlp.linear_fc2.lora_B.weight"] == (False, -1, 1, True)
    no_sp = built[0][(2, False)]["attributes"]
    assert not any(sp for *_, sp in no_sp.values())


def test_trainable_parameter_count_matches_the_formula(built):
    g, r = tiny_gpt.Geometry(), CONFIG.r
    per_layer = (r * (g.hidden + g.qkv_out)          # linear_qkv
                 + r * (g.hidden + g.hidden)          # linear_proj (q projection size = hidden)
                 + r * (g.hidden + 2 * g.ffn)         # linear_fc1 (gate and up)
                 + r * (g.ffn + g.hidden))            # linear_fc2
    expected = g.layers * per_layer
    assert built[0][(1, False)]["trainable_local"] == expected
    # At TP=2 each rank holds the replicated matrices whole and half of each split one.
    attrs = built[0][(2, False)]["attributes"]
    full = built[0][(2, False)]["lora_full"]
    split = sum(full[n].numel() for n, (is_split, *_) in attrs.items() if is_split)
    assert built[0][(2, False)]["trainable_local"] + built[1][(2, False)]["trainable_local"] \
        == 2 * expected - split


def test_spec_route_freezes_the_layers_base(built):
    for rank in built:
        for layout in LAYOUTS:
            assert rank[layout]["trainable_base_in_layers"] == [], layout
