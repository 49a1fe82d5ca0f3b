"""slime's own training actor, with `patches/slime-624b824a-lora.patch` applied, on 2 CPU ranks.

slime 624b824a and the Megatron-LM it pins (1dcf0daf, with slime's own Megatron patches) are
extracted from `../shared/vendor` (or `$MEGATRON_LORA_VENDOR`) once per session and patched with
`git apply`; each layout is one 2-rank launch that runs slime's `parse_args`,
`MegatronTrainRayActor.init`, `train`, its weight-sync classes, `save_model` and a resume
(`tests/support/slime/stages.py`), with stand-ins only for what needs a GPU (SGLang's engines,
torch_memory_saver, Ray's cluster, CUDA-only calls; `tests/support/slime/`). Each test below
asserts one stage on every layout: the tiny dense Qwen2 at TP=2 + SP (fp32), PP=2 (bf16, slime's
default), canonical and under the recipes' recompute, and slime's launch recipes scaled down
(`../shared/vendor/slime-624b824a-scripts.tar.gz`): the Qwen3-30B-A3B MoE recipe, the GLM-4.7 /
Moonlight MLA recipe (first layer dense, shared expert, sigmoid router with expert bias) and
context parallelism (run-glm4-9B.sh's CP=2).
"""

from __future__ import annotations

import functools

import pytest
import torch

from support.slime import sources


def _why_not() -> str | None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        # make test-compat: its pins (contourpy, peft on Python 3.12) need numpy 2
        return (f"slime 624b824a's Megatron backend asserts numpy 1.x (slime/backends/"
                f"megatron_utils/initialize.py); this environment has numpy {numpy.__version__}")
    return sources.missing_reason()


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))

# The launch recipes' flags each recipe layout runs beside its parallel sizes (scripts/run-*.sh):
# activation recompute (21 of slime's 23 recipes), dynamic batching, fp32 grad reduction and
# softmax, GRPO's clipping and KL type, Adam as the recipes set it. What they set that cannot run
# on a CPU host is in the README ("What the recipe layouts run").
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"]
PERF = [*RECOMPUTE, "--use-dynamic-batch-size", "--max-tokens-per-gpu", "32",
        "--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32"]
RECIPE = [*PERF, "--kl-loss-type", "low_var_kl", "--entropy-coef", "0.00", "--eps-clip", "0.2",
          "--eps-clip-high", "0.28", "--optimizer", "adam", "--adam-beta1", "0.9",
          "--adam-beta2", "0.98", "--balance-data"]
# run-qwen3-30B-A3B.sh: TP=4 + SP, EP=8, ETP=1 -> TP=2 + SP, EP=2, ETP=1 (2 ranks)
EP2 = ["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"]

# adapters: (adapter parameters on each rank, adapter tensors in the checkpoint)
LAYOUTS = {"tp2_sp_fp32": {"tp": 2, "pp": 1, "bf16": False, "adapters": (16, 16)},
           "pp2_bf16": {"tp": 1, "pp": 2, "bf16": True, "adapters": (8, 16)},
           # --lora-canonical: per-projection adapters through every stage slime runs
           "tp2_sp_fp32_canonical": {"tp": 2, "pp": 1, "bf16": False, "canonical": True,
                                     "adapters": (28, 28)},
           # the activation recompute of slime's launch recipes, on the LoRA run only
           "tp2_sp_fp32_recompute": {"tp": 2, "pp": 1, "bf16": False, "recompute": True,
                                     "adapters": (16, 16)},
           # run-qwen3-30B-A3B.sh (models/qwen3-30B-A3B.sh): 8 experts top-2, grouped GEMM
           # (TE's GroupedLinear, emulated), all-to-all dispatch; 4 of the 8 experts per rank
           "qwen3_moe_recipe": {"tp": 2, "pp": 1, "bf16": False, "model": "tiny_qwen3_moe",
                                "recipe": [*EP2, *RECIPE], "adapters": (40, 72),
                                "reference": "qwen3_moe_reference",
                                "built": {"mlp": ["MoELayer"] * 2,
                                          "experts": ["TEGroupedMLP"] * 2,
                                          "dispatcher": "alltoall", "ep": 2, "etp": 1}},
           # the same model and recipe flags at TP=1, EP=1 (2 data-parallel ranks), no
           # recompute: what the recipe layout must train like (train stage only)
           "qwen3_moe_reference": {"tp": 1, "pp": 1, "bf16": False, "model": "tiny_qwen3_moe",
                                   "recipe": RECIPE[len(RECOMPUTE):], "stages": "train"},
           # run-glm4.7-30B-A3B.sh / run-moonlight-16B-A3B.sh (TP + SP, EP): MLA with q and kv
           # latent ranks, layer 0 dense (--moe-layer-freq), a shared expert, sigmoid router
           # with expert bias and top-k scaling; LoRA on every MLA linear and every MLP
           "deepseek_v3_recipe": {"tp": 2, "pp": 1, "bf16": False, "model": "tiny_deepseek_v3",
                                  "recipe": [*EP2, *RECIPE], "adapters": (44, 60),
                                  "built": {"mlp": ["MLP", "MoELayer"],
                                            "experts": ["NoneType", "TEGroupedMLP"],
                                            "attention": "MLASelfAttention",
                                            "router": ("sigmoid", True), "shared_experts": 32,
                                            "dispatcher": "alltoall", "ep": 2}},
           # run-glm4-9B.sh's context parallelism (TP=2 + SP, CP=2 -> CP=2) and its perf
           # flags: slime's zigzag split of every sequence, attention over the CP group (TE's,
           # emulated); trains like the dense model at TP=2 + SP under recompute
           "cp2_recipe": {"tp": 1, "pp": 1, "bf16": False,
                          "recipe": ["--context-parallel-size", "2", *PERF],
                          "adapters": (16, 16), "reference": "tp2_sp_fp32_recompute",
                          "built": {"cp": 2}}}
FULL_RUNS = [name for name, layout in LAYOUTS.items() if layout.get("stages") != "train"]


def adapter_count(layout) -> int:
    """Adapter tensors of the whole model (all layers and experts), as the checkpoint holds
    them."""
    return layout["adapters"][1]


def _model(run):
    from support.slime import actors

    return actors.model_module(run["layout"].get("model", "tiny_qwen2"))


@pytest.fixture(scope="session")
def slime_trees(tmp_path_factory):
    return sources.prepare(tmp_path_factory.mktemp("slime-sources"))


@pytest.fixture(scope="session")
def layout_runs(slime_trees, tmp_path_factory):
    """`layout_runs(name)`: the 2-rank launch of one layout, run once per session."""
    from megatron_cpu.processes import run_on_ranks
    from support.slime import actors, runtime, stages

    runs = {}

    def launch(name: str) -> dict:
        if name in runs:
            return runs[name]
        layout = LAYOUTS[name]
        work = tmp_path_factory.mktemp(f"slime-{name}")
        dtype = torch.bfloat16 if layout["bf16"] else torch.float32
        model = actors.model_module(layout.get("model", "tiny_qwen2"))
        hf = model.write_hf_checkpoint(work / "hf", dtype=dtype)
        ranks = run_on_ranks(
            stages.run_layout, world_size=2, timeout=900,
            args=(str(work), str(hf), str(slime_trees.unpatched_arguments), layout),
            setup=functools.partial(runtime.setup, str(slime_trees.slime),
                                    str(slime_trees.megatron_lm)))
        runs[name] = {"layout": layout, "ranks": ranks, "hf": hf, "dtype": dtype}
        return runs[name]

    return launch


@pytest.fixture(scope="module", params=FULL_RUNS)
def run(request, layout_runs):
    return layout_runs(request.param)


def _hf_log_probs(model, rollout_id, args_like):
    """log p(response token | prefix) under an HF model, per sample, as slime slices them."""
    from support.slime import rollout

    tokens, _ = rollout.samples(rollout_id, args_like)
    tokens = torch.tensor(tokens)
    with torch.no_grad():
        logits = model(tokens).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return [row[rollout.PROMPT - 1:] for row in log_probs], logits


class _Batch:
    rollout_batch_size, n_samples_per_prompt = 2, 2


def _tol(run):
    return dict(rtol=0, atol=2e-5) if run["dtype"] == torch.float32 else dict(rtol=0, atol=0.1)


def test_megatron_is_slimes_pinned_megatron_lm(run, slime_trees):
    for rank in run["ranks"]:
        assert rank["megatron_core_file"].startswith(str(slime_trees.megatron_lm))


def test_lora_flags_reach_slimes_args_and_an_unpatched_slime_drops_them(run):
    for rank in run["ranks"]:
        assert rank["flags_patched"] == {"use_lora": True, "lora_r": 4, "lora_alpha": 8.0,
                                         "lora_only_trainable": True}
        assert set(rank["flags_unpatched"].values()) == {"absent"}


def test_init_builds_the_lora_model_with_only_adapters_trainable(run):
    layout = run["layout"]
    for rank in run["ranks"]:
        init = rank["init"]
        assert init["trainable"] == init["lora_names"]
        # every adapter of this rank's layers (all layers, or one stage's under PP) and experts
        assert len(init["lora_names"]) == layout["adapters"][0]
        assert init["base_equal"], "the LoRA model's base is not the checkpoint's"
        assert init["B_zero"] and init["A_nonzero"]
        # the reference policy is the actor's frozen base: no second copy was loaded
        assert init["lora_ref"] and "ref" not in init["backup_tags"]
    last = run["ranks"][-1]
    for got, want in zip(last["init_log_probs"], last["base_log_probs"][0], strict=True):
        assert torch.equal(got, want), "B = 0 must give the base model's log-probs exactly"


@pytest.mark.parametrize("strict", ["assume_ok_unexpected", "log_unexpected", "log_all",
                                    "raise_unexpected", "raise_all", "return_unexpected",
                                    "return_all", "ignore_all"])
def test_base_only_torch_dist_start_works_with_every_strictness(run, strict):
    """The LoRA model loads the base-only checkpoint exactly as the plain model does.

    Megatron-LM itself refuses two strictnesses for slime's start from a checkpoint, LoRA or
    not (the plain model is the control): raise_all, since a finetune load requests no RNG
    state and the checkpoint holds one, and return_*, whose (state, missing, unexpected) tuple
    its `load_checkpoint` does not unpack."""
    for rank in run["ranks"]:
        plain = rank["strictness_plain"][strict]
        if strict in ("raise_all", "return_unexpected", "return_all"):
            assert plain != "loaded" and "lora" not in plain, plain
        else:
            assert plain == "loaded", plain
        # through slime's (patched) load_checkpoint: no failure of its own, ever
        outcome, unchanged = rank["strictness"][(strict, True)]
        assert outcome == plain
        if outcome == "loaded":
            assert unchanged, "the base reloaded exactly and the adapters kept their init"
        # Megatron-LM's own load_checkpoint, without the patch's hook: the layers alone load
        # it wherever Megatron tolerates absent keys (slime's Megatron-LM skips them under the
        # default); raise_unexpected refuses them, by Megatron's contract.
        outcome, unchanged = rank["strictness"][(strict, False)]
        if strict == "raise_unexpected":
            assert "Unexpected keys" in outcome and "lora_" in outcome, outcome
        elif strict == "raise_all":
            assert outcome != "loaded", outcome
        else:
            assert outcome == plain and (outcome != "loaded" or unchanged), outcome


def test_two_rollouts_train_only_the_adapters_and_the_reference_stays_the_base(run):
    for rank in run["ranks"]:
        init_base = rank["train"][0]["params"][0]
        previous = None
        for step in rank["train"]:
            base, lora = step["params"]
            assert all(torch.equal(base[n], t) for n, t in init_base.items())
            if previous is not None:
                assert any(not torch.equal(lora[n], previous[n]) for n in lora)
            previous = lora
        assert all(t.any() for n, t in previous.items() if ".lora_B." in n), "B moved off zero"
    last = run["ranks"][-1]
    for rollout_id, step in enumerate(last["train"]):
        # slime's ref_log_probs, computed inside disable_lora, are the base model's exactly
        assert len(step["ref_log_probs"]) == 4
        for got, want in zip(step["ref_log_probs"], last["base_log_probs"][rollout_id],
                             strict=True):
            assert torch.equal(got, want)
    # ...while the actor's own log-probs have moved
    assert any(not torch.allclose(a, b) for a, b in
               zip(last["trained_log_probs"][0], last["base_log_probs"][0], strict=True))


def test_recipe_recompute_trains_the_adapters_as_no_recompute_does(layout_runs):
    """`--recompute-granularity full --recompute-method uniform --recompute-num-layers 1`, as
    slime's recipes run: after each rollout the adapters equal those of the same run without
    recompute (and they moved: the two-rollouts test above holds for this layout too)."""
    plain = layout_runs("tp2_sp_fp32")["ranks"]
    recomputed = layout_runs("tp2_sp_fp32_recompute")["ranks"]
    for rank_plain, rank_recomputed in zip(plain, recomputed, strict=True):
        assert rank_recomputed["recompute"] == ("full", "uniform", 1)
        for want, got in zip(rank_plain["train"], rank_recomputed["train"], strict=True):
            lora_want, lora_got = want["params"][1], got["params"][1]
            assert lora_got.keys() == lora_want.keys()
            for name, value in lora_want.items():
                torch.testing.assert_close(lora_got[name], value, rtol=1e-6, atol=1e-7,
                                           msg=name)


def _synced(run) -> dict[str, dict[str, torch.Tensor]]:
    rank0 = run["ranks"][0]
    sync = rank0["sync"]
    nccl = {}
    for rank in run["ranks"]:  # each pipeline stage's source rank sends its own layers
        nccl.update(rank["sync"]["nccl"])
    return {"colocated": sync["colocated"][0], "nccl": nccl, "disk": sync["disk"],
            "delta": sync["delta"], "save_hf": rank0["saved"]["hf"]}


def test_every_sync_path_sends_the_same_merged_hf_tensors(run):
    from support.slime import hf_checkpoints

    synced = _synced(run)
    hf_names = hf_checkpoints.tensor_names(run["hf"])  # MoE experts per expert, as saved
    colocated = run["ranks"][0]["sync"]["colocated"]
    assert all(_same(part, colocated[0]) for part in colocated), "engine TP ranks differ"
    for path, tensors in synced.items():
        assert set(tensors) == hf_names, (path, set(tensors) ^ hf_names)
        assert not any("lora" in name for name in tensors), path
        assert _same(tensors, synced["colocated"]), path
    # the adapters reached the engine: exactly the weights of the adapted modules whose B moved
    # off zero differ from the base (an expert no token reached keeps B = 0)
    base = _hf_base(run)
    changed = {n for n in hf_names if not torch.equal(synced["colocated"][n], base[n])}
    _, export = run["ranks"][0]["sync"]["adapter_colocated"]["export"]
    moved = {key.removeprefix("base_model.model.").replace(".lora_B.weight", ".weight")
             for key, B in export.items() if key.endswith(".lora_B.weight") and B.any()}
    assert moved <= hf_names, sorted(moved - hf_names)  # every PEFT module is an HF weight
    assert changed == moved, sorted(changed ^ moved)
    assert len(moved) >= 0.7 * len({k for k in export if k.endswith(".lora_B.weight")})


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n].to(a[n].dtype)) for n in a)


def test_hf_model_from_the_synced_tensors_gives_the_lora_models_logits_and_log_probs(run):
    from support.slime import hf_checkpoints

    model = hf_checkpoints.hf_model(run["hf"], run["dtype"], state=_synced(run)["colocated"])
    last = run["ranks"][-1]
    hf_log_probs, hf_logits = _hf_log_probs(model, 0, _Batch)
    for got, want in zip(hf_log_probs, last["trained_log_probs"][0], strict=True):
        torch.testing.assert_close(got, want.float(), **_tol(run))
    if last["trained_logits"] is not None:  # no pipeline or CP: the model's own forward
        torch.testing.assert_close(hf_logits, last["trained_logits"], **_tol(run))
    base = hf_checkpoints.hf_model(run["hf"], run["dtype"])
    base_log_probs, _ = _hf_log_probs(base, 0, _Batch)
    for got, want in zip(base_log_probs, last["base_log_probs"][0], strict=True):
        torch.testing.assert_close(got, want.float(), **_tol(run))


def test_colocated_sync_reads_only_the_cpu_backup(run):
    rank0 = run["ranks"][0]
    # every live weight was NaN during the sync; what arrived is finite (and equal to the
    # other paths, above), and the live weights were restored
    assert all(torch.isfinite(t).all() for t in rank0["sync"]["colocated"][0].values())
    assert rank0["sync"]["colocated_calls"][0] == "pause_generation"
    assert rank0["sync"]["colocated_calls"][-1] == "continue_generation"
    for rank in run["ranks"]:
        assert rank["sync"]["live_restored"]
    assert rank0["sync"]["delta_applied"] == [1]


def _hf_base(run):
    """The HF checkpoint's tensors by their saved names."""
    from support.slime import hf_checkpoints

    return hf_checkpoints.read_tensors(run["hf"])


def _adapter_loads_equal_the_export(loads, export, doubled_after=None):
    """Each load is the adapter named "policy", its config PEFT's, its tensors (read as SGLang
    reads the payload) the PEFT export of the same model; from load `doubled_after` on, every
    B is doubled (the backup's were, between the syncs)."""
    config, tensors = export
    for index, (name, sent_config, sent) in enumerate(loads):
        assert name == "policy"
        assert sent_config == config  # no rsLoRA here: SGLang's config is PEFT's
        doubled = doubled_after is not None and index >= doubled_after
        want = {k: t * 2 if doubled and ".lora_B." in k else t for k, t in tensors.items()}
        assert sent.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(sent[key], value), (index, key)


def test_adapter_sync_colocated_sends_the_unmerged_base_once_then_only_the_adapter(run):
    """--lora-sync adapter on slime's colocated updater (live weights NaN: the CPU backup is
    read): the first sync sends the base, unmerged (bit-equal to the HF checkpoint's) and loads
    the adapter; the second only unloads and loads it again, the new version."""
    sync = run["ranks"][0]["sync"]["adapter_colocated"]
    sends = [c for c in sync["calls"] if c.startswith("update_weights_from_tensor")]
    calls = [c for i, c in enumerate(sync["calls"])
             if not (c.startswith("update_weights_from_tensor")
                     and i and sync["calls"][i - 1] == c)]
    assert calls == [
        "pause_generation", "flush_cache", "update_weights_from_tensor v1",
        "load_lora_adapter_from_tensors policy", "update_weight_version 1", "continue_generation",
        "pause_generation", "flush_cache",
        "unload_lora_adapter policy", "load_lora_adapter_from_tensors policy",
        "update_weight_version 2", "continue_generation"], sync["calls"]
    assert sends and set(sends) == {"update_weights_from_tensor v1"}  # the base: first sync only
    base = _hf_base(run)
    for part in sync["base"]:  # every engine TP rank: the HF base itself, never merged
        assert part.keys() == base.keys()
        assert all(torch.equal(part[n], base[n]) for n in base)
    assert len(sync["loads"]) == 2
    _adapter_loads_equal_the_export(sync["loads"], sync["export"], doubled_after=1)
    assert sync["decoder"] == "sglang"  # read with SGLang's own deserializer, from the wheel
    for rank in run["ranks"]:
        assert rank["sync"]["adapter_colocated"]["live_restored"]


def test_adapter_sync_distributed_sends_the_unmerged_base_and_the_adapter_over_http(run):
    """--lora-sync adapter on slime's NCCL updater: its base chunks are the HF base (no
    adapter folded in, none sent); a later sync loads the adapter read from the live
    parameters into a non-colocated engine."""
    base = {}
    for rank in run["ranks"]:  # each pipeline stage's source rank sends its own layers
        base.update(rank["sync"]["adapter_distributed"]["base"])
    hf_base = _hf_base(run)
    assert base.keys() == hf_base.keys()
    assert all(torch.equal(base[n], hf_base[n].to(base[n].dtype)) for n in base)
    sync = run["ranks"][0]["sync"]["adapter_distributed"]
    assert sync["calls"] == ["pause_generation", "flush_cache",
                             "load_lora_adapter_from_tensors policy", "update_weight_version 1",
                             "continue_generation"]
    _adapter_loads_equal_the_export(sync["loads"],
                                    run["ranks"][0]["sync"]["adapter_colocated"]["export"])


def test_save_model_writes_the_adapter_file(run):
    from megatron_lora import read_lora_checkpoint

    assert run["ranks"][0]["saved"]["adapter_file"]
    checkpoint = read_lora_checkpoint(_work(run) / "run" / "iter_0000001" / "adapter.safetensors")
    assert len(checkpoint.tensors) == adapter_count(run["layout"])
    assert checkpoint.config.canonical is bool(run["layout"].get("canonical"))
    assert (checkpoint.config.r, checkpoint.config.alpha) == (4, 8)
    # every adapter of every stage and expert, each rank's share of them as trained
    for rank in run["ranks"]:
        assert len(rank["trained_lora"]) == run["layout"]["adapters"][0]


def _work(run):
    return run["hf"].parent


def test_resume_with_load_restores_the_adapters_exactly(run):
    last = run["ranks"][-1]
    for rank in run["ranks"]:
        assert rank["resume"]["start_rollout_id"] == 2
        assert rank["resume"]["lora_equal"] and rank["resume"]["base_equal"]
    for got, want in zip(last["resume"]["log_probs"], last["trained_log_probs"][0], strict=True):
        assert torch.equal(got, want)


# ----- the recipe layouts ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, layout in LAYOUTS.items() if "built" in layout])
def test_recipe_flags_built_what_they_name(layout_runs, name):
    """Megatron built what the recipe's flags ask for (grouped experts, the dispatcher, MLA,
    the dense first layer, the router, expert / context parallel sizes), with slime's
    recompute, dynamic batching and fp32 grad reduction on."""
    run = layout_runs(name)
    for rank in run["ranks"]:
        built = rank["built"]
        for key, want in run["layout"]["built"].items():
            assert built[key] == want, (key, built[key])
        assert rank["recompute"] == ("full", "uniform", 1)
        assert built["dynamic_batch_size"] and built["grad_reduce_in_fp32"]


@pytest.mark.parametrize("name", [n for n, layout in LAYOUTS.items() if "reference" in layout])
def test_recipe_layouts_train_like_their_reference(layout_runs, name):
    """After each rollout every adapter (saved whole, by its global name: experts by global
    index) equals that of the same run at other parallel sizes: the MoE recipe at TP=2 + SP, EP=2
    under recompute the same model at TP=1, EP=1 over two data-parallel ranks; CP=2 the dense
    model at TP=2 + SP (both under recompute). Adam divides each grad by its own size, so an
    element whose grad is at fp32 rounding level moves by about the learning rate (2e-2) either
    way: measured, the MoE recipe's largest difference 1.3e-5 on such elements, the rest within
    1e-5; hence atol 3e-5 (1.5e-3 of the learning rate)."""
    from megatron_lora import read_lora_checkpoint

    run, reference = layout_runs(name), layout_runs(LAYOUTS[name]["reference"])
    for rollout_id in range(2):
        got, want = (read_lora_checkpoint(_work(r) / f"adapters-{rollout_id}.safetensors").tensors
                     for r in (run, reference))
        assert got.keys() == want.keys() and len(got) == adapter_count(run["layout"])
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=3e-5,
                                       msg=f"rollout {rollout_id}: {key}")
        assert any(t.any() for k, t in got.items() if ".lora_B." in k)


def test_the_adapter_payload_on_the_base_is_the_merged_sync(run):
    """What `--lora-sync adapter` sends, applied as SGLang applies it (`W + lora_alpha / r *
    B @ A` per HF module, experts one by one), turns the HF base into what the merged sync sends:
    the adapter's names, splits (q/k/v, gate/up, each expert, MLA's linears) and scaling are
    the model's."""
    from support.slime import hf_checkpoints

    config, tensors = run["ranks"][0]["sync"]["adapter_colocated"]["export"]
    base = hf_checkpoints.read_tensors(run["hf"])
    merged = dict(_synced(run)["colocated"])
    scaling = config["lora_alpha"] / config["r"]
    applied = dict(base)
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            weight = base[module + ".weight"]
            applied[module + ".weight"] = (weight.double() + scaling * B.double() @ A.double())
    for name, value in merged.items():
        torch.testing.assert_close(applied[name].to(value.dtype), value, **_merge_tol(run),
                                   msg=name)


def _merge_tol(run):
    # the merged sync computes W + s B A in fp32 per shard and casts once
    return dict(rtol=0, atol=1e-6) if run["dtype"] == torch.float32 else dict(rtol=0, atol=0.02)


# SGLang's fused LoRA slots and the HF modules they stack, in their order
_SGLANG_STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj",
                                                                               "up_proj"),
                  "fused_qkv_a_proj_with_mqa": ("q_a_proj", "kv_a_proj_with_mqa")}


def test_sglangs_loader_takes_every_tensor_of_the_payload(run):
    """SGLang 0.5.15.post1's own `LoRAAdapter` (from the pinned wheel) loads the payload the
    engine received: every tensor lands in a layer, every weight it normalizes names a module
    the adapter targets (its memory pool's `get_target_module_name`), routed experts keep their
    global index, and each of SGLang's stacked slots (q/k/v, gate/up, MLA's q_a + kv_a) holds,
    slice by slice, the delta the merged sync applied to that HF weight."""
    import json
    import types

    from support import sglang_wheel
    from support.slime import hf_checkpoints

    if sglang_wheel.missing_reason():
        pytest.skip(sglang_wheel.missing_reason())
    _, config, sent = run["ranks"][0]["sync"]["adapter_colocated"]["loads"][0]
    layers = json.loads((run["hf"] / "config.json").read_text())["num_hidden_layers"]
    with sglang_wheel.lora_modules() as sg:
        lora_config = sg.LoRAConfig.from_dict(config, None, base_vocab_size=hf_checkpoints.VOCAB)
        adapter = sg.LoRAAdapter("policy", lora_config,
                                 types.SimpleNamespace(num_hidden_layers=layers), None, None, None)
        assert all(sg.get_layer_id(name) is not None for name in sent)
        adapter.initialize_weights_from_tensors(sent)
        targets = sg.get_normalized_target_modules(lora_config.target_modules)
        weights = [dict(layer.weights) for layer in adapter.layers]
        for layer in weights:
            for name in layer:
                sg.get_target_module_name(name, targets)  # raises for a weight it cannot place
        scaling = adapter.scaling
    base = hf_checkpoints.read_tensors(run["hf"])
    merged = _synced(run)["colocated"]
    seen = set()
    for layer in weights:
        for name, A in layer.items():
            if ".lora_A." not in name:
                continue
            B = layer[name.replace(".lora_A.", ".lora_B.")]
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            parent, slot = module.rsplit(".", 1)
            parts = [f"{parent}.{leaf}" for leaf in _SGLANG_STACKS.get(slot, (slot,))]
            rows = [base[f"{p}.weight"].shape[0] for p in parts]
            r = A.shape[0] // len(parts)
            for i, (part, B_i) in enumerate(zip(parts, B.split(rows), strict=True)):
                delta = scaling * B_i.double() @ A[i * r:(i + 1) * r].double()
                torch.testing.assert_close(
                    (merged[f"{part}.weight"].double() - base[f"{part}.weight"].double()),
                    delta, **_merge_tol(run), msg=part)
                seen.add(part)
    # every HF module of the payload was checked through SGLang's slots
    sent_modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in sent}
    assert seen == sent_modules, sorted(seen ^ sent_modules)
