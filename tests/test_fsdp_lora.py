"""fsdp_lora in one process, checked against real `peft` and `transformers`."""

from __future__ import annotations

import argparse
import copy
import json
import math
import warnings

import pytest
import torch

from fsdp_lora import (
    HF_TARGET_MODULES,
    LoRAConfig,
    LoRALinear,
    add_lora_arguments,
    apply_lora_to_fsdp_model,
    disable_lora,
    get_lora_parameters,
    iter_merged_weights,
    load_peft_adapter,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    save_peft_adapter,
    unmerge_lora_weights,
)
from lora_common.peft_files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_config_dict,
    read_peft_adapter,
    write_peft_adapter,
)
from support.compare import assert_same
from support.fsdp_llama import build_llama, randomize_lora, token_batches

CONFIG = LoRAConfig(r=4, alpha=8)
TOKENS = token_batches(1)[0]


def peft_key(name: str) -> str:
    """Our parameter name -> PEFT's (`...q_proj.lora_A.weight` -> `...lora_A.default.weight`)."""
    return "base_model.model." + name.replace(".weight", ".default.weight")


def peft_twin(ours, base, config: LoRAConfig = CONFIG):
    """`peft.get_peft_model` on a copy of `base`, holding our model's LoRA values."""
    from peft import LoraConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=config.r, lora_alpha=config.alpha, use_rslora=config.use_rslora,
        target_modules=list(HF_TARGET_MODULES), task_type="CAUSAL_LM"))
    theirs = twin.state_dict()
    with torch.no_grad():
        for name, value in ours.state_dict().items():
            if "lora_" in name:
                theirs[peft_key(name)].copy_(value)
    return twin


def lora_model(config: LoRAConfig = CONFIG, randomize: bool = True, **model_overrides):
    base = build_llama(**model_overrides)
    ours = apply_lora_to_fsdp_model(copy.deepcopy(base), config)
    if randomize:
        randomize_lora(ours)
    return base, ours


@torch.no_grad()
def logits(model, tokens=TOKENS):
    return model(input_ids=tokens).logits


# ------------------------------------------------------------------ the layer and its init


def test_fresh_adapter_keeps_base_names_and_weights():
    base = build_llama()
    ours = apply_lora_to_fsdp_model(build_llama(), CONFIG)
    names = dict(ours.named_parameters())
    for name, value in base.named_parameters():   # same names, same values: no `base_layer.`
        assert_same(names.pop(name), value, name)
    q = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q, torch.nn.Linear)
    assert sorted(names) == sorted(
        f"model.layers.{i}.{block}.{target}.lora_{f}.weight" for i in range(2)
        for block, targets in (("self_attn", "q_proj k_proj v_proj o_proj"),
                               ("mlp", "gate_proj up_proj down_proj"))
        for target in targets.split() for f in "AB")
    assert q.lora_A.weight.shape == (4, 48) and q.lora_B.weight.shape == (48, 4)
    assert [n for n, p in names.items() if "lora_B" in n and p.any()] == []   # B starts at zero
    assert_same(logits(ours), logits(base), "logits with B = 0 vs the base model")


def test_apply_does_not_consume_the_global_rng():
    model = build_llama()
    before = torch.get_rng_state()
    apply_lora_to_fsdp_model(model, CONFIG)
    assert_same(torch.get_rng_state(), before, "global RNG state")


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_A_init_has_peft_distribution_and_depends_on_seed_and_name(init):
    from peft import LoraConfig, get_peft_model

    config = LoRAConfig(r=8, alpha=16, init=init, seed=5)
    _, ours = lora_model(config, randomize=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(build_llama(), LoraConfig(
        r=8, lora_alpha=16, target_modules=list(HF_TARGET_MODULES),
        init_lora_weights=True if init == "kaiming" else "gaussian"))
    theirs = dict(peft_model.named_parameters())
    for name, a in ours.named_parameters():
        if "lora_A" in name:
            a_peft = theirs[peft_key(name)]
            # PEFT: kaiming-uniform(a=sqrt(5)) is uniform in +-1/sqrt(in); gaussian has std 1/r
            assert a.std().item() == pytest.approx(a_peft.std().item(), rel=0.2), name
            if init == "kaiming":
                bound = 1 / math.sqrt(a.shape[1])
                assert a.abs().max() <= bound and a_peft.abs().max() <= bound
                assert a.abs().max() > 0.9 * bound
    a_q0 = ours.model.layers[0].self_attn.q_proj.lora_A.weight
    _, again = lora_model(config, randomize=False)
    assert_same(again.model.layers[0].self_attn.q_proj.lora_A.weight, a_q0, "A drawn again")
    assert not torch.equal(ours.model.layers[1].self_attn.q_proj.lora_A.weight, a_q0)
    _, reseeded = lora_model(LoRAConfig(r=8, alpha=16, init=init, seed=6), randomize=False)
    assert not torch.equal(reseeded.model.layers[0].self_attn.q_proj.lora_A.weight, a_q0)


def test_meta_model_draws_lora_at_materialization():
    _, eager = lora_model(randomize=False)
    meta = apply_lora_to_fsdp_model(build_llama(device="meta"), CONFIG)
    assert meta.model.layers[0].self_attn.q_proj.lora_A.weight.is_meta
    meta.to_empty(device="cpu")                     # FSDP2's path
    expected = {n: p for n, p in eager.named_parameters() if "lora_" in n}
    for name, value in meta.named_parameters():
        if "lora_" in name:
            assert_same(value, expected[name], name)
    # FSDP1's path: to_empty(recurse=False) then reset_parameters(), module by module
    fsdp1 = apply_lora_to_fsdp_model(build_llama(device="meta"), CONFIG)
    with torch.no_grad():
        for module in fsdp1.modules():
            if list(module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    for name, value in fsdp1.named_parameters():
        if "lora_" in name:
            assert_same(value, expected[name], name)


class RecordOps:
    """The aten ops run inside the block, minus free ones (views, transposes)."""

    FREE = {"view", "t", "_unsafe_view", "detach", "reshape", "transpose", "contiguous"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def compute(self):
        return sorted(op for op in self.ops if op not in self.FREE)


def test_forward_and_backward_do_no_output_sized_elementwise_work():
    layer = apply_lora_to_fsdp_model(build_llama(), CONFIG).model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 48, requires_grad=True)
    with RecordOps() as forward:
        y = layer(x)
    assert forward.compute == ["addmm_", "mm", "mm"], forward.ops      # base, x A^T, += s h B^T
    grad = torch.ones_like(y)
    with RecordOps() as backward:
        y.backward(grad)
    # g B, g W (+= g_h A in place), g_h^T x, g^T h; the two mul_ scale [tokens, r] and [out, r]
    assert backward.compute == ["addmm_", "mm", "mm", "mm", "mm", "mul_", "mul_"], backward.ops


@pytest.mark.parametrize("base_trains", [False, True])
def test_layer_gradients_equal_autograd_of_the_plain_formula(base_trains):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, dtype=torch.float64)
    layer = LoRALinear.from_linear(linear, LoRAConfig(r=3, alpha=5, use_rslora=True), "layer")
    torch.nn.init.normal_(layer.lora_B.weight)
    linear.weight.requires_grad_(base_trains)
    linear.bias.requires_grad_(base_trains)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + \
        ([layer.weight, layer.bias] if base_trains else [])
    grad = torch.randn(2, 4, 5, dtype=torch.float64)
    ours = torch.autograd.grad(layer(x), params, grad)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.lora_scaling * (
        x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    expected = torch.autograd.grad(plain, params, grad)
    for name, a, b in zip(["x", "A", "B", "W", "b"], ours, expected, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))


# ------------------------------------------------------------------ parity with peft


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_logits_and_lora_grads_as_peft(use_rslora):
    config = LoRAConfig(r=4, alpha=8, use_rslora=use_rslora)
    base, ours = lora_model(config)
    twin = peft_twin(ours, base, config)
    ours_out = ours(input_ids=TOKENS, labels=TOKENS)
    twin_out = twin(input_ids=TOKENS, labels=TOKENS)
    torch.testing.assert_close(ours_out.logits, twin_out.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_out.logits, logits(base), atol=1e-3)   # LoRA is in effect
    ours_out.loss.backward()
    twin_out.loss.backward()
    theirs = dict(twin.named_parameters())
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 28 and [n for n, g in grads.items() if g is None] == []
    assert {n for n, p in theirs.items() if p.requires_grad} == {peft_key(n) for n in grads}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs[peft_key(name)].grad, atol=1e-6, rtol=1e-4)


def test_merged_weights_equal_peft_merge_and_unload_and_unmerge_restores():
    base, ours = lora_model()
    expected = peft_twin(ours, base).merge_and_unload().state_dict()
    before = {n: p.clone() for n, p in ours.named_parameters()}
    lora_logits = logits(ours)

    streamed = dict(iter_merged_weights(ours))     # does not touch the model
    assert streamed.keys() == expected.keys()
    for name, value in streamed.items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5)
    for name, value in ours.named_parameters():
        assert_same(value, before[name], f"{name} after streaming")

    merge_lora_weights(ours)
    merged_once = {n: p.clone() for n, p in ours.named_parameters()}
    with pytest.raises(RuntimeError, match=r"merge_lora_weights: 14 LoRA module\(s\) are merged "
                                           r"\(unmerge_lora_weights first\), "
                                           r"e.g. 'model.layers.0.self_attn.q_proj'"):
        merge_lora_weights(ours)                   # refused before adding anything twice
    for name, value in ours.named_parameters():
        assert_same(value, merged_once[name], f"{name} after the refused merge")
    state = ours.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(ours), lora_logits, atol=1e-5, rtol=1e-5)
    assert_same(dict(iter_merged_weights(ours))["model.layers.0.mlp.up_proj.weight"],
                state["model.layers.0.mlp.up_proj.weight"], "stream of the merged model")

    unmerge_lora_weights(ours)
    for name, value in ours.named_parameters():
        torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours), lora_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError,
                       match=r"unmerge_lora_weights: 14 LoRA module\(s\) are not merged"):
        unmerge_lora_weights(ours)


def test_disable_lora_is_the_base_model_nests_and_restores_on_error():
    base, ours = lora_model()
    base_logits, lora_logits = logits(base), logits(ours)
    with disable_lora(ours):
        assert_same(logits(ours), base_logits, "inside disable_lora")
        with disable_lora(ours):
            assert_same(logits(ours), base_logits, "inside nested disable_lora")
        assert_same(logits(ours), base_logits, "after the inner exit")  # kept the outer state
    assert_same(logits(ours), lora_logits, "after disable_lora")
    with pytest.raises(RuntimeError, match="boom"):
        with disable_lora(ours):
            raise RuntimeError("boom")
    assert_same(logits(ours), lora_logits, "after an exception inside disable_lora")
    with disable_lora(ours):                    # the weight stream follows what the model computes
        streamed = dict(iter_merged_weights(ours))
        with pytest.raises(RuntimeError, match="inside disable_lora"):
            merge_lora_weights(ours)
    for name, value in base.named_parameters():
        assert_same(streamed[name], value, f"{name} streamed inside disable_lora")
    merge_lora_weights(ours)
    with pytest.raises(RuntimeError, match=r"disable_lora: 14 LoRA module\(s\) are merged"):
        with disable_lora(ours):
            pass


def test_dropout_only_touches_the_adapter_branch():
    base, ours = lora_model(LoRAConfig(r=4, alpha=8, dropout=0.5), randomize=False)
    ours.train()
    assert_same(logits(ours), logits(base.train()), "B = 0")  # dropout changes nothing
    randomize_lora(ours)
    _, plain = lora_model(LoRAConfig(r=4, alpha=8))
    ours.eval()
    torch.testing.assert_close(logits(ours), logits(plain.eval()), atol=1e-6, rtol=0)
    ours.train()
    assert not torch.allclose(logits(ours), logits(plain), atol=1e-4)


def test_trainable_parameters_and_flags():
    _, ours = lora_model()
    lora = get_lora_parameters(ours)
    assert list(lora) == [n for n, _ in ours.named_parameters() if "lora_" in n]
    assert len(lora) == 28 and {id(p) for p in lora.values()} == \
        {id(p) for p in ours.parameters() if p.requires_grad}
    parser = add_lora_arguments(argparse.ArgumentParser())
    args = parser.parse_args("--lora-r 2 --lora-target-modules q_proj v_proj "
                             "--no-lora-only-trainable".split())
    model = apply_lora_to_fsdp_model(build_llama(), args)
    assert model.model.layers[0].self_attn.q_proj.lora_config.r == 2
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == []  # base trains
    mark_only_lora_as_trainable(model)
    assert sum(p.requires_grad for p in model.parameters()) == 8


def test_bf16_base_with_fp32_adapter():
    base, ours = lora_model()
    expected = logits(ours)
    for name, param in ours.named_parameters():
        if "lora_" not in name:
            param.data = param.data.bfloat16()
    out = logits(ours)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


# ------------------------------------------------------------------ the PEFT format


def test_saved_adapter_config_is_what_peft_writes(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoRAConfig(r=4, alpha=8, dropout=0.1, use_rslora=True,
                        exclude_modules=("model.layers.1.mlp.down_proj",))
    _, ours = lora_model(config)
    save_peft_adapter(ours, tmp_path / "ours")
    twin = get_peft_model(build_llama(), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True, task_type="CAUSAL_LM",
        target_modules=list(HF_TARGET_MODULES), exclude_modules=["model.layers.1.mlp.down_proj"]))
    twin.save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "ours" / ADAPTER_CONFIG_FILE).read_text())
    peft_written = json.loads((tmp_path / "peft" / ADAPTER_CONFIG_FILE).read_text())
    for field in ("target_modules", "exclude_modules"):
        peft_written[field] = sorted(peft_written[field])
    assert {k: peft_written[k] for k in written} == written
    assert (tmp_path / "ours" / ADAPTER_CONFIG_FILE).read_text() == json.dumps(
        written, indent=2, sort_keys=True)


def _load_recording_warnings(directory):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(build_llama(), str(directory))
    return model, sorted({str(w.message) for w in caught})


def test_peft_loads_our_adapter_with_no_warnings_and_same_logits(tmp_path):
    config = LoRAConfig(r=4, alpha=8, exclude_modules=("model.layers.0.self_attn.k_proj",))
    base, ours = lora_model(config)
    save_peft_adapter(ours, tmp_path / "ours")
    peft_twin(ours, base).save_pretrained(tmp_path / "peft")   # PEFT's own, for its warnings
    loaded, warned = _load_recording_warnings(tmp_path / "ours")
    _, peft_own_warned = _load_recording_warnings(tmp_path / "peft")
    assert warned == peft_own_warned                # e.g. transformers deprecations, nothing more
    assert [message for message in warned if "adapter" in message.lower()] == []
    torch.testing.assert_close(logits(loaded), logits(ours), atol=1e-5, rtol=1e-5)
    k0 = loaded.base_model.model.model.layers[0].self_attn.k_proj
    assert not hasattr(k0, "lora_A")                # PEFT adapted exactly our modules


def test_we_load_what_peft_saves(tmp_path):
    base, ours = lora_model(randomize=False)
    twin = peft_twin(ours, base)
    randomize_lora(twin)
    twin.save_pretrained(tmp_path)
    load_peft_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours), logits(twin), atol=1e-5, rtol=1e-5)
    adapter = read_peft_adapter(tmp_path)
    assert adapter.lora_config().target_modules == tuple(sorted(HF_TARGET_MODULES))
    assert adapter.scaling == CONFIG.scaling


# ------------------------------------------------------------------ bad input


def test_unknown_target_lists_the_linear_names():
    with pytest.raises(ValueError, match="'qproj' matches no module of LlamaForCausalLM; .*"
                                         "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        apply_lora_to_fsdp_model(build_llama(), LoRAConfig(target_modules=["q_proj", "qproj"]))


def test_non_linear_target_and_unknown_exclude_are_refused_before_any_swap():
    model = build_llama()
    with pytest.raises(ValueError,
                       match=r"'model.embed_tokens' \(Embedding\); LoRA adapts nn.Linear"):
        apply_lora_to_fsdp_model(model, LoRAConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match="exclude_modules entry 'q_prj' matches no module"):
        apply_lora_to_fsdp_model(model, LoRAConfig(exclude_modules=["q_prj"]))
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == []
    apply_lora_to_fsdp_model(model, CONFIG)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora_to_fsdp_model(model, CONFIG)


def _saved(tmp_path, config=CONFIG, **model_overrides):
    _, model = lora_model(config, **model_overrides)
    save_peft_adapter(model, tmp_path)
    return tmp_path


def test_adapter_for_another_geometry_is_refused_and_changes_nothing(tmp_path):
    _, target = lora_model()
    before = {n: p.clone() for n, p in target.named_parameters()}
    wider = _saved(tmp_path / "wider", hidden_size=64)
    with pytest.raises(ValueError, match=r"wider/adapter_model.safetensors: base_model\.model\."
                                         r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight "
                                         r"has shape \[4, 64\], but .* needs \[4, 48\]"):
        load_peft_adapter(target, wider)
    other_r = _saved(tmp_path / "r8", LoRAConfig(r=8, alpha=16))
    with pytest.raises(ValueError, match="adapter_config.json: r=8, .* was built with r=4"):
        load_peft_adapter(target, other_r)
    other_alpha = _saved(tmp_path / "alpha", LoRAConfig(r=4, alpha=16))
    with pytest.raises(ValueError, match=r"lora_alpha=16.0, .*\(scaling 4\) but .* scaling 2"):
        load_peft_adapter(target, other_alpha)
    fewer = _saved(tmp_path / "qv", LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="no adapter for 10 LoRA module"):
        load_peft_adapter(target, fewer)
    for name, value in target.named_parameters():
        assert_same(value, before[name], f"{name} after the refused loads")


def test_unreadable_or_unsupported_adapter_files_name_the_culprit(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _saved(tmp_path / "ok")
    config_path = directory / ADAPTER_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="adapter_config.json: use_dora=True is a PEFT feature"):
        read_peft_adapter(directory)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        read_peft_adapter(directory)
    with pytest.raises(FileNotFoundError, match="nowhere is not a directory"):
        read_peft_adapter(tmp_path / "nowhere")
    config_path.write_text(json.dumps(config))
    weights = load_file(directory / ADAPTER_WEIGHTS_FILE)
    save_file({**weights, "base_model.model.lm_head.weight": torch.zeros(96, 48)},
              directory / ADAPTER_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="'base_model.model.lm_head.weight' is not a LoRA factor"):
        read_peft_adapter(directory)
    del weights["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(weights, directory / ADAPTER_WEIGHTS_FILE)
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj.lora_B.weight is missing"):
        read_peft_adapter(directory)


def test_writer_checks_shapes_before_writing(tmp_path):
    config = adapter_config_dict(CONFIG, ["q_proj"])
    good, bad = (torch.zeros(4, 8), torch.zeros(8, 4)), (torch.zeros(4, 8), torch.zeros(8, 3))
    with pytest.raises(ValueError, match=r"layers.1.q_proj.lora_B.weight: expected shape "
                                         r"\[out, r=4\], got \[8, 3\]"):
        write_peft_adapter(tmp_path, config, {"layers.0.q_proj": good, "layers.1.q_proj": bad})
    assert list(tmp_path.iterdir()) == []
