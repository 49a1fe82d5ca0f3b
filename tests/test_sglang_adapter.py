"""The adapter sync's payload through SGLang's own loading code (0.5.15.post1, the version slime
624b824a's image pins), run on CPU from the pinned wheel (`support/sglang_wheel.py`; the wheel is
downloaded by `make venv`, never installed, never copied into the repo).

What runs is SGLang's: `MultiprocessingSerializer.deserialize` (the restricted unpickler every
engine TP rank runs on the one `serialized_tensors` string), `LoRAConfig.from_dict`,
`LoRAAdapter.initialize_weights_from_tensors` (layer ids, q/k/v and gate/up normalisation,
scaling) and the target-module matching its memory pool applies. What is parsed from SGLang's
source (the server itself cannot start here): the request structs the engine calls fill, the
HTTP routes, `ServerArgs`' fields and the target-module choices.
"""

from __future__ import annotations

import base64
import multiprocessing
import pickle
import types

import pytest
import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import sglang_wheel, tiny_gpt
from support.compare import assert_same

pytestmark = pytest.mark.skipif(sglang_wheel.missing_reason() is not None,
                                reason=str(sglang_wheel.missing_reason()))

# rsLoRA, so the payload's scaling fold is exercised; one module excluded
CONFIG = LoRAConfig(r=4, alpha=8, use_rslora=True,
                    exclude_modules=("decoder.layers.1.mlp.linear_fc2",))


def payload_case():
    """At TP=2 + SP: the config and payload the adapter sync sends, what it was made of, and
    the model's full fused adapters and scaling."""
    from megatron_lora import full_adapter_tensors, gather_peft_adapter, lora_spec
    from megatron_lora.interop import sglang
    from megatron_lora.modules import lora_modules
    from megatron_lora.sync.adapter_tensors import adapter_state
    from support import lora_helpers

    initialize_model_parallel(tp=2)
    model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG), sequence_parallel=True)
    lora_helpers.set_nonzero_B(model)
    backup = {f"module.module.{n}": p.detach().clone() for n, p in model.named_parameters()}
    adapter = gather_peft_adapter(backup, model)
    fused = full_adapter_tensors(adapter_state(model), model)
    if adapter is None:
        return None
    scaling = {m.lora_scaling for m in lora_modules(model).values()}
    return {"config": sglang.serving_config(adapter.config),
            "payload": sglang.encode_tensors(adapter.tensors()),
            "tensors": adapter.tensors(), "fused": fused, "scaling": scaling}


@pytest.fixture(scope="module")
def sent():
    return run_on_ranks(payload_case, world_size=2, tp=2)[0]


def test_sglangs_deserializer_reads_the_payload_bit_for_bit(sent):
    received = sglang_wheel.serializer().deserialize(sent["payload"])
    assert_same(received, sent["tensors"], "deserialized payload")
    # pickle writes a tensor's whole storage: q/k/v's B, views of the fused B, must not each
    # carry all of it (measured before the fix: twice the adapter's bytes)
    own = {name: t.clone() for name, t in sent["tensors"].items()}
    assert len(base64.b64decode(sent["payload"])) <= len(pickle.dumps(own, protocol=5))


def _deserialize_in_child(payload: str) -> str:
    from support import sglang_wheel

    try:
        tensors = sglang_wheel.serializer().deserialize(payload)
    except Exception as error:  # noqa: BLE001 - the second fd consumer fails, as in SGLang
        return f"{type(error).__name__}"
    return f"ok {len(tensors)}"


def test_every_engine_tp_rank_can_read_the_one_string(sent):
    """SGLang hands all TP ranks the same `serialized_tensors`: our inline payload is read by
    two processes; SGLang's own default (ForkingPickler of CPU tensors, file descriptors) is
    read by the first only, which is why the sync does not use it."""
    serializer = sglang_wheel.serializer()
    forking = serializer.serialize(dict(list(sent["tensors"].items())[:2]), output_str=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        ours = [pool.apply_async(_deserialize_in_child, (sent["payload"],)) for _ in range(2)]
        ours = [r.get(timeout=120) for r in ours]
        theirs = [pool.apply_async(_deserialize_in_child, (forking,)).get(timeout=120)
                  for _ in range(2)]
    assert ours == [f"ok {len(sent['tensors'])}"] * 2
    assert theirs[0] == "ok 2" and theirs[1] != "ok 2", theirs


def test_sglang_loads_every_tensor_under_the_names_it_expects(sent):
    from megatron_lora.interop import hf_mapping
    from megatron_lora.interop.geometry import Geometry
    from megatron_lora.sync.slime import sglang_launch_flags

    tensors = sglang_wheel.serializer().deserialize(sent["payload"])
    geometry = Geometry(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        kv_channels=16, ffn_hidden_size=96)
    with sglang_wheel.lora_modules() as sg:
        config = sg.LoRAConfig.from_dict(sent["config"], None, base_vocab_size=tiny_gpt.VOCAB)
        assert (config.r, config.use_dora, config.lora_added_tokens_size) == (4, False, 0)
        adapter = sg.LoRAAdapter("policy", config, types.SimpleNamespace(num_hidden_layers=2),
                                 None, None, None)
        # SGLang's scaling (lora_alpha / r, rsLoRA ignored) is the model's alpha / sqrt(r)
        assert {adapter.scaling} == sent["scaling"]
        # every tensor lands in a layer (a key without one is dropped silently)
        assert all(sg.get_layer_id(name) is not None for name in tensors)
        adapter.initialize_weights_from_tensors(tensors)
        adapter_targets = sg.get_normalized_target_modules(config.target_modules)
        # the server started with the flags check_lora_sync_args asks for serves every target
        flags = sglang_launch_flags(4, hf_mapping.hf_target_modules(
            ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))).split()
        served = sg.get_normalized_target_modules(
            flags[flags.index("--sglang-lora-target-modules") + 1:])
        assert adapter_targets <= served
        weights = [layer.weights for layer in adapter.layers]
    assert adapter_targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    for layer, got in enumerate(weights):
        prefix = f"base_model.model.model.layers.{layer}."
        wanted = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj"}
        if layer == 0:
            wanted.add("mlp.down_proj")  # excluded in layer 1: SGLang zero-fills its slot
        assert set(got) == {f"{prefix}{m}.lora_{f}.weight" for m in wanted for f in "AB"}
        # SGLang's fused slots hold Megatron's fused adapter, rows in HF order
        fused = sent["fused"]
        qkv = f"decoder.layers.{layer}.self_attention.linear_qkv"
        A = fused[f"{qkv}.lora_A.weight"]
        assert_same(got[f"{prefix}self_attn.qkv_proj.lora_A.weight"], A.repeat(3, 1), "qkv A")
        assert_same(got[f"{prefix}self_attn.qkv_proj.lora_B.weight"],
                    torch.cat(hf_mapping.split_target("linear_qkv", fused[f"{qkv}.lora_B.weight"],
                                                      geometry)), "qkv B")
        fc1 = f"decoder.layers.{layer}.mlp.linear_fc1"
        assert_same(got[f"{prefix}mlp.gate_up_proj.lora_A.weight"],
                    fused[f"{fc1}.lora_A.weight"].repeat(2, 1), "gate_up A")
        assert_same(got[f"{prefix}mlp.gate_up_proj.lora_B.weight"], fused[f"{fc1}.lora_B.weight"],
                    "gate_up B")


def test_our_engine_calls_fit_sglangs_requests_routes_and_server_args():
    """Parsed from the wheel's source: every body our engine calls post fills exactly fields
    the request struct has (all of its required ones); the routes exist; generation takes
    `lora_path`; the server flags check_lora_sync_args reads are `ServerArgs` fields."""
    from megatron_lora.interop import hf_mapping, sglang

    bodies = {
        ("load_lora_adapter_from_tensors", "LoadLoRAAdapterFromTensorsReqInput"):
            sglang.lora_load_request({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
                                     "payload"),
        ("unload_lora_adapter", "UnloadLoRAAdapterReqInput"): sglang.lora_unload_request(),
        ("update_weight_version", "UpdateWeightVersionReqInput"):
            sglang.weight_version_request(3),
    }
    routes = sglang_wheel.http_routes()
    for (route, struct), body in bodies.items():
        assert route in routes, route
        fields = sglang_wheel.class_fields("srt/managers/io_struct.py", struct)
        required = {name for name, default in fields.items() if default is None}
        assert required <= set(body) <= set(fields), (struct, sorted(body), fields)
    assert {"pause_generation", "continue_generation"} <= routes
    generate = sglang_wheel.class_fields("srt/managers/io_struct.py", "GenerateReqInput")
    assert "lora_path" in generate
    server = sglang_wheel.class_fields("srt/server_args.py", "ServerArgs")
    assert {"enable_lora", "max_lora_rank", "lora_target_modules", "dp_size", "max_loaded_loras",
            "enable_weights_cpu_backup", "lora_paths"} <= set(server)
    assert server["max_loaded_loras"] == "None" and server["dp_size"] == "1"
    import ast

    choices = next(node.value for node in ast.parse(sglang_wheel.source("srt/utils/common.py")).body
                   if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "SUPPORTED_LORA_TARGET_MODULES")
    supported = set(ast.literal_eval(choices))
    assert set(hf_mapping.hf_target_modules(hf_mapping.TARGETS)) <= supported
