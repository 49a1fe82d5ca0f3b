"""The slime patch (`patches/slime-624b824a-lora.patch`) and the weight-sync view it calls.

slime cannot run here (GPUs, SGLang, Ray), so the patch is checked as text: a well-formed
unified diff of exactly the files it claims, calling only `megatron_lora` names that exist with
signatures its calls bind to, and (where the slime mirror exists) applying to the pinned commit
and compiling. `merged_weights` / `iter_merged_tensors`, the helpers its weight-sync hunks call,
run on real megatron-core at TP=1 and TP=2+SP.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lora_common import LoRAConfig
from megatron_cpu.launch import initialize_model_parallel, run_on_ranks
from support import lora_helpers, tiny_gpt
from support.compare import assert_same, identity
from support.outcomes import assert_raised, outcome

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "slime-624b824a-lora.patch"
README = ROOT / "patches" / "README.md"
SLIME_COMMIT = "624b824a898ab0ec1fcb4d373004c7f3852bf515"
SLIME_MIRROR = Path(os.environ.get("SLIME_MIRROR", "/work/.mirror/THUDM+slime/repo"))
CLAIMED_FILES = {
    "slime/utils/arguments.py",
    "slime/backends/megatron_utils/actor.py",
    "slime/backends/megatron_utils/checkpoint.py",
    "slime/backends/megatron_utils/update_weight/update_weight_from_distributed.py",
    "slime/backends/megatron_utils/update_weight/hf_weight_iterator_direct.py",
    "slime/backends/megatron_utils/hf_checkpoint_saver.py",
    "slime/backends/megatron_utils/hf_to_megatron/common.py",
    "slime/backends/megatron_utils/update_weight/update_weight_from_tensor.py",
    "slime/backends/sglang_utils/sglang_engine.py",
    "slime/rollout/sglang_rollout.py",
    "slime/rollout/sglang_streaming_rollout.py",
}
CONFIG = LoRAConfig(r=4, alpha=8)
LAYOUTS = [(2, True), (1, False)]

# ----- the patch as text ---------------------------------------------------------------------

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_patch(text: str) -> dict[str, list[list[str]]]:
    """`{path: [hunk lines]}` of a `git diff`-style patch; raises AssertionError where the text
    is not a well-formed unified diff (headers, hunk line counts)."""
    files: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines) and not lines[i].startswith("diff --git "):
        i += 1  # free text before the first diff, which git apply ignores
    assert i < len(lines), "no 'diff --git' header"
    while i < len(lines):
        header = re.fullmatch(r"diff --git a/(\S+) b/(\S+)", lines[i])
        assert header and header.group(1) == header.group(2), f"bad header: {lines[i]!r}"
        path = header.group(1)
        assert path not in files, f"{path} patched twice"
        i += 1
        assert re.fullmatch(r"index [0-9a-f]+\.\.[0-9a-f]+ 100644", lines[i]), lines[i]
        assert lines[i + 1] == f"--- a/{path}" and lines[i + 2] == f"+++ b/{path}", path
        i += 3
        hunks = files[path] = []
        while i < len(lines) and not lines[i].startswith("diff --git "):
            match = _HUNK.match(lines[i])
            assert match, f"{path}: expected a hunk header, got {lines[i]!r}"
            old = int(match.group(2) or 1)
            new = int(match.group(4) or 1)
            i += 1
            hunk = []
            while old > 0 or new > 0:
                line = lines[i]
                assert line[:1] in (" ", "-", "+"), f"{path}: bad hunk line {line!r}"
                old -= line[0] in " -"
                new -= line[0] in " +"
                hunk.append(line)
                i += 1
            assert old == 0 and new == 0, f"{path}: hunk line counts do not match its header"
            hunks.append(hunk)
        assert hunks, f"{path}: no hunks"
    return files


def added_blocks(hunks: list[list[str]]) -> list[str]:
    """The runs of consecutive added lines, each joined into one block of source."""
    blocks = []
    for hunk in hunks:
        block: list[str] = []
        for line in hunk + [" "]:
            if line.startswith("+"):
                block.append(line[1:])
            elif block:
                blocks.append("\n".join(block))
                block = []
    return blocks


def imported_names(source: str) -> list[str]:
    names = []
    for match in re.finditer(r"from megatron_lora(?:\.\w+)* import (?:\(([^)]*)\)|([^\n]*))",
                             source):
        listed = match.group(1) if match.group(1) is not None else match.group(2)
        names += [n.strip() for n in listed.split(",") if n.strip()]
    return names


def calls_of(name: str, source: str) -> list[ast.Call]:
    """Every call `name(...)` in `source`, parsed (the arguments may span lines)."""
    calls = []
    for match in re.finditer(rf"(?<![\w.]){name}\(", source):
        depth, end = 0, None
        for j in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[j], 0)
            if depth == 0:
                end = j + 1
                break
        assert end is not None, f"unbalanced call of {name} in {source!r}"
        calls.append(ast.parse(source[match.start():end], mode="eval").body)
    return calls


@pytest.fixture(scope="module")
def patch_files():
    return parse_patch(PATCH.read_text())


def test_patch_is_a_well_formed_diff_of_exactly_the_claimed_files(patch_files):
    assert set(patch_files) == CLAIMED_FILES
    readme = README.read_text()
    for path in CLAIMED_FILES:
        assert f"`{path}`" in readme, f"patches/README.md does not describe {path}"
    for path, hunks in patch_files.items():
        for hunk in hunks:
            changed = [line for line in hunk if line[0] in "+-"]
            assert changed, f"{path}: a hunk that changes nothing"
            assert len(changed) <= 25, f"{path}: a hunk of {len(changed)} changed lines"


def test_every_megatron_lora_name_exists_and_every_call_binds(patch_files):
    import megatron_lora

    seen = set()
    for path, hunks in patch_files.items():
        source = "\n".join(added_blocks(hunks))
        names = imported_names(source)
        assert names or "megatron_lora" not in source, path
        for name in names:
            assert name in megatron_lora.__all__, f"{path}: megatron_lora has no public {name}"
            target = getattr(megatron_lora, name)
            calls = calls_of(name, source)
            assert calls, f"{path}: imports {name} but never calls it"
            signature = inspect.signature(target)
            for call in calls:
                assert not any(isinstance(a, ast.Starred) for a in call.args), ast.unparse(call)
                try:
                    signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
                except TypeError as error:
                    pytest.fail(f"{path}: {ast.unparse(call)} does not fit {name}{signature}: "
                                f"{error}")
            seen.add(name)
    # The verbs the patch is built around.
    assert {"add_lora_arguments", "custom_megatron_init", "disable_lora", "merged_weights",
            "rollout_weights", "iter_rollout_tensors", "is_lora_parameter", "save_lora_checkpoint",
            "allow_missing_adapters", "check_lora_sync_args", "AdapterSync",
            "lora_request_fields", "lora_load_request", "lora_unload_request",
            "weight_version_request"} <= seen


def test_no_adapter_name_is_matched_by_hand(patch_files):
    """The adapter naming rule lives in the package (`is_lora_parameter`), not in slime."""
    for path, hunks in patch_files.items():
        for block in added_blocks(hunks):
            assert "lora_A" not in block and "lora_B" not in block, path


def _git(*args, **kwargs):
    return subprocess.run(["git", *args], capture_output=True, text=True, **kwargs)


def _pristine_claimed_files(into: Path) -> str | None:
    """The claimed files at the pinned commit, into a scratch folder: from the slime mirror
    (a git repository), else from the vendored archive of that commit (`../shared/vendor`, which
    CI has). None if there is neither."""
    import tarfile

    from support.slime import sources

    if SLIME_MIRROR.is_dir():
        git_dir = f"--git-dir={SLIME_MIRROR}"
        assert _git(git_dir, "cat-file", "-e", f"{SLIME_COMMIT}^{{commit}}").returncode == 0
        archive = subprocess.run(["git", git_dir, "archive", SLIME_COMMIT, *sorted(CLAIMED_FILES)],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        return f"the mirror at {SLIME_COMMIT}"
    archive = sources.vendor_dir() / sources.SLIME_ARCHIVE
    if not archive.is_file():
        return None
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        tar.extractall(into, members=[members[p] for p in sorted(CLAIMED_FILES)], filter="data")
    return str(archive)


@pytest.mark.skipif(shutil.which("git") is None, reason="git apply needs git")
def test_patch_applies_to_the_pinned_slime_commit_and_compiles(tmp_path):
    if _pristine_claimed_files(tmp_path) is None:
        pytest.skip(f"no slime mirror at {SLIME_MIRROR} and no vendored slime archive: the "
                    f"patch is checked as text only")
    before = {p: (tmp_path / p).read_text() for p in CLAIMED_FILES}
    applied = _git("apply", "--check", str(PATCH), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    applied = _git("apply", str(PATCH), cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    for path in CLAIMED_FILES:
        after = (tmp_path / path).read_text()
        assert after != before[path], path
        compile(after, path, "exec")
    # And it is a real check: a second application no longer fits.
    assert _git("apply", "--check", str(PATCH), cwd=tmp_path).returncode != 0


# ----- the weight-sync helpers on real megatron-core -----------------------------------------

def _slime_names(model) -> dict[str, torch.Tensor]:
    """The live parameters under names like slime's global ones (a DDP-style prefix)."""
    return {f"module.module.{name}": param for name, param in model.named_parameters()}


def _errors(model, plain):
    from megatron_lora import (
        disable_lora,
        is_lora_parameter,
        iter_merged_tensors,
        merge_lora_weights,
        merged_weights,
        unmerge_lora_weights,
    )

    live = _slime_names(model)
    errors = {}

    def error_of(fn):
        return outcome((ValueError, RuntimeError, KeyError), fn)

    qkv_B = next(n for n in live if n.endswith("linear_qkv.lora_B.weight"))
    errors["missing_B"] = error_of(lambda: merged_weights(
        {n: t for n, t in live.items() if n != qkv_B}, model))
    fc2_A = next(n for n in live if n.endswith("linear_fc2.lora_A.weight"))
    errors["bad_shape"] = error_of(lambda: merged_weights(
        {**live, fc2_A: torch.zeros(live[fc2_A].shape[0], 3)}, model))
    errors["adapter_key"] = error_of(lambda: merged_weights(live, model)[qkv_B])
    errors["adapters_without_lora"] = error_of(lambda: merged_weights(live, plain))
    errors["stream_without_lora"] = error_of(
        lambda: list(iter_merged_tensors(iter(live.items()), plain)))
    errors["fewer_pairs"] = error_of(lambda: merged_weights(
        {n: t for n, t in live.items() if ".layers.1." not in n}, model))
    merge_lora_weights(model)
    errors["merged"] = error_of(lambda: merged_weights(live, model))
    unmerge_lora_weights(model)
    with disable_lora(model):
        errors["disabled"] = error_of(lambda: merged_weights(live, model))

    # Without LoRA both forms hand back what they were given: the same objects.
    plain_live = _slime_names(plain)
    errors["plain_view"] = (identity(merged_weights(plain_live, plain)), identity(plain_live))
    streamed = list(iter_merged_tensors(iter(plain_live.items()), plain))
    errors["plain_stream"] = ([(n, identity(t)) for n, t in streamed],
                              [(n, identity(t)) for n, t in plain_live.items()])
    errors["rule"] = [is_lora_parameter(n) for n in (
        "a.linear_qkv.lora_A.weight", "lora_B.weight", "a.linear_qkv.weight",
        "a.lora_A.weight.x", "a.xlora_A.weight", "a.lora_C.weight")]
    return errors


def weight_sync_cases():
    from megatron_lora import iter_merged_tensors, iter_merged_weights, lora_spec, merged_weights
    from megatron_lora.sync.merged import LAYOUT_ATTRIBUTES

    out = {}
    for tp, sp in LAYOUTS:
        initialize_model_parallel(tp=tp)
        model = tiny_gpt.build_gpt(lora_spec(tiny_gpt.local_spec(), CONFIG), sequence_parallel=sp)
        lora_helpers.set_nonzero_B(model)
        live = _slime_names(model)
        before = {n: p.detach().clone() for n, p in live.items()}
        reference = {f"module.module.{n}": t.clone() for n, t in iter_merged_weights(model)}
        r = {}

        view = merged_weights(live, model)
        r["names"] = (list(view), [n for n in live if ".lora_" not in n], list(reference))
        r["contained"] = [n for n in live if n in view]  # asked for every name, adapters too
        values = {n: view[n] for n in view}  # the view merges on each access: once per name
        # clones: a name without an adapter is the live tensor, which later cases change
        r["view"] = {n: t.detach().clone() for n, t in values.items()}
        r["reference"] = reference
        r["adapters"] = list(view.adapters)
        r["before"] = before
        # The merged shard carries its base weight's layout, so a gather that reads the
        # attributes off the tensor it is handed (as slime's all_gather_param does) works.
        r["layout"] = {n: ({a: getattr(values[n], a, "absent") for a in LAYOUT_ATTRIBUTES
                            if hasattr(live[n], a)},
                           {a: getattr(live[n], a) for a in LAYOUT_ATTRIBUTES
                            if hasattr(live[n], a)})
                       for n in view.adapters}
        group = lora_helpers.tp_group()
        from megatron_lora.layers import sharding
        r["full"] = {n[len("module.module."):]: sharding.full_tensor(view[n], group)
                     for n in view}

        # A CPU copy without attributes (slime's backup), merged on a given device.
        backup = {n: p.detach().clone() for n, p in live.items()}
        copy_view = merged_weights(backup, model, device="cpu")
        r["backup_view"] = {n: copy_view[n].detach().clone() for n in reference}
        # The stream form: same names and values, same order.
        r["streamed"] = [(n, t.detach().clone())
                         for n, t in iter_merged_tensors(iter(live.items()), model)]
        r["after"] = {n: p.detach().clone() for n, p in live.items()}
        r["requires_grad"] = [n for n in view.adapters if values[n].requires_grad]

        if (tp, sp) == (1, False):
            plain = tiny_gpt.build_gpt()
            r["errors"] = _errors(model, plain)
        out[(tp, sp)] = r
    return out


@pytest.fixture(scope="module")
def cases():
    return run_on_ranks(weight_sync_cases, world_size=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_view_has_exactly_the_base_names_and_the_merged_values(cases, layout):
    for rank in cases:
        r = rank[layout]
        view_names, base_names, reference_names = r["names"]
        assert view_names == base_names == reference_names
        assert r["contained"] == base_names
        # the view must equal iter_merged_weights bit for bit
        for name, value in r["reference"].items():
            assert_same(r["view"][name], value, f"view {name}")
        adapters = r["adapters"]
        assert len(adapters) == 2 * 4  # 2 layers x qkv, proj, fc1, fc2
        # B != 0: every delta reaches the engine
        unchanged = [n for n in adapters if torch.equal(r["view"][n], r["before"][n])]
        assert unchanged == []
        for name, (view_layout, live_layout) in r["layout"].items():
            assert view_layout == live_layout, name
        assert r["requires_grad"] == []
        assert_same(r["after"], r["before"], "live parameters after the view and the stream")
        for name, value in r["reference"].items():
            assert_same(r["backup_view"][name], value, f"view of the CPU copy {name}")
        assert [n for n, _ in r["streamed"]] == list(r["reference"])
        for name, value in r["streamed"]:
            assert_same(value, r["reference"][name], f"stream {name}")


def test_tp2_gathered_view_equals_the_tp1_merge(cases):
    reference = cases[0][(1, False)]["full"]
    for rank in cases:
        got = rank[(2, True)]["full"]
        assert list(got) == list(reference)
        for name, value in reference.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_bad_input_is_named(cases):
    errors = cases[0][(1, False)]["errors"]
    assert_raised(errors["missing_B"], re.escape("linear_qkv.lora_A.weight has no"))
    assert_raised(errors["missing_B"], re.escape("linear_qkv.lora_B.weight"))
    assert_raised(errors["bad_shape"], re.escape("linear_fc2.weight"))
    assert_raised(errors["bad_shape"], "cannot take")
    assert errors["adapter_key"].error == "KeyError"
    assert_raised(errors["adapter_key"], "folded")
    assert_raised(errors["adapters_without_lora"], "no LoRA module")
    assert_raised(errors["stream_without_lora"], "no LoRA module")
    assert_raised(errors["fewer_pairs"], re.escape("pair 4 adapter(s)"))
    assert_raised(errors["fewer_pairs"], re.escape("8 LoRA module(s)"))
    assert_raised(errors["merged"], re.escape("merged_weights: 8 LoRA module(s) are merged"))
    assert_raised(errors["disabled"], "inside disable_lora")
    view, given = errors["plain_view"]
    assert view == given  # the very dict it was given
    streamed, given = errors["plain_stream"]
    assert streamed == given  # the same names in order, each the very tensor it was given
    assert errors["rule"] == [True, True, False, False, False, False]


# ----- an MoE model at EP=2: slime's global expert names ------------------------------------

_SLIME_EXPERT = re.compile(r"mlp\.experts\.(.+)\.(weight|bias)(\d+)")


def slime_global_names(model) -> dict[str, torch.Tensor]:
    """The live parameters as slime's `named_params_and_buffers(args, model,
    convert_to_global_name=True)` names them at 624b824a (update_weight/common.py, one chunk,
    no pipeline offset): `module.module.` in front, and a grouped expert linear's numbered
    parameters (`linear_fc1.weight<i>`, and with LoRA `linear_fc1.lora_B.weight<i>`, which the
    same rule matches) renumbered by this EP rank's expert offset."""
    from megatron.core import parallel_state

    per_rank = model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    offset = parallel_state.get_expert_model_parallel_rank() * per_rank
    names = {}
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.+)", name)
        rest = match.group(2) if match else None
        expert = _SLIME_EXPERT.match(rest) if rest else None
        if expert:
            rest_, kind, index = expert.groups()
            layer = match.group(1)
            name = f"decoder.layers.{layer}.mlp.experts.{rest_}.{kind}{int(index) + offset}"
        names[f"module.module.{name}"] = param
    return names


def moe_weight_sync_cases():
    """At EP=2 (TE grouped experts, per-expert and shared-outer adapters) and at EP=1: the
    merged view of slime's globally named weights, its stream form, and the adapter checkpoint
    names; every merged expert weight gathered by its global name."""
    from megatron_lora import iter_merged_tensors, iter_merged_weights, merged_weights
    from megatron_lora.persist.adapter_checkpoint import gather_adapter
    from support import moe_cases

    out = {}
    for layout in ("EP2", "EP1"):
        for expert_layout in ("per_expert", "shared_outer"):
            moe_cases.use_layout(layout)
            config = LoRAConfig(r=4, alpha=8, expert_layout=expert_layout)
            model = moe_cases.lora_moe(config, te=True)
            lora_helpers.set_nonzero_B(model, seed=0, scale=0.1)
            live = slime_global_names(model)
            local_names = dict(zip(live, (n for n, _ in model.named_parameters()), strict=True))
            reference = dict(iter_merged_weights(model))  # local names, this rank's shards
            view = merged_weights(live, model)
            r = {"names": list(view), "adapted": sorted(view.adapters),
                 "stream": [n for n, _ in iter_merged_tensors(iter(live.items()), model)],
                 # under the global names: the view, iter_merged_weights, the adapted bases
                 "view": {n: view[n].detach().clone() for n in view},
                 "reference": {n: reference[local_names[n]].detach().clone() for n in view},
                 "base": {n: live[n].detach().clone() for n in view.adapters}}
            merged = {n: view[n].clone() for n in view if ".experts." in n}
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, merged)
            r["experts_merged"] = {n: t for rank in everyone for n, t in rank.items()}
            checkpoint = gather_adapter(model)
            r["checkpoint_names"] = None if checkpoint is None else sorted(checkpoint.tensors)
            out[(layout, expert_layout)] = r
    return out


@pytest.fixture(scope="module")
def moe_cases_ep():
    import te_emulation

    return run_on_ranks(moe_weight_sync_cases, world_size=2, setup=te_emulation.enable,
                        timeout=900)


@pytest.mark.parametrize("expert_layout", ["per_expert", "shared_outer"])
def test_moe_weight_sync_carries_every_expert_delta_under_slimes_global_names(
        moe_cases_ep, expert_layout):
    for rank, results in enumerate(moe_cases_ep):
        r = results[("EP2", expert_layout)]
        assert not any(".lora_" in n for n in r["names"]) and r["names"] == r["stream"]
        assert_same(r["view"], r["reference"], f"rank {rank}: view vs iter_merged_weights")
        # This rank's two global experts of each layer: fc1 and fc2 each, plus attention.
        experts = [2 * rank, 2 * rank + 1]
        expected = sorted(
            [f"module.module.decoder.layers.{layer}.self_attention.{m}.weight"
             for layer in (0, 1) for m in ("linear_qkv", "linear_proj")]
            + [f"module.module.decoder.layers.{layer}.mlp.experts.{fc}.weight{e}"
               for layer in (0, 1) for fc in ("linear_fc1", "linear_fc2") for e in experts])
        assert r["adapted"] == expected
        # B != 0: every merged weight differs from its base
        unchanged = [n for n in r["adapted"] if torch.equal(r["view"][n], r["base"][n])]
        assert unchanged == [], f"rank {rank}: merged equals base for {unchanged}"


@pytest.mark.parametrize("expert_layout", ["per_expert", "shared_outer"])
def test_moe_merged_experts_at_ep2_equal_those_at_ep1(moe_cases_ep, expert_layout):
    reference = moe_cases_ep[0][("EP1", expert_layout)]["experts_merged"]
    for results in moe_cases_ep:
        got = results[("EP2", expert_layout)]["experts_merged"]
        assert sorted(got) == sorted(reference)
        for name, value in reference.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("expert_layout", ["per_expert", "shared_outer"])
def test_moe_adapter_checkpoint_names_experts_globally(moe_cases_ep, expert_layout):
    at_ep2 = moe_cases_ep[0][("EP2", expert_layout)]["checkpoint_names"]
    assert at_ep2 == moe_cases_ep[0][("EP1", expert_layout)]["checkpoint_names"]
    assert moe_cases_ep[1][("EP2", expert_layout)]["checkpoint_names"] is None  # rank 0 writes
    experts = {int(m.group(1)) for n in at_ep2
               if (m := re.search(r"experts\.linear_fc2\.lora_A\.weight(\d+)$", n))}
    assert experts == {0, 1, 2, 3}
