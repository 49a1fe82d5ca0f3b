"""Which class megatron-core builds for each MLA linear, on its local and TE specs, with and
without q compression (checked on the installed megatron-core: 0.16.1 in `make test`, 0.19.2 in
`make test-compat`), and that LoRA adapts every one of them: B = 0 is the plain model, TP=2+SP
gives TP=1's logits and adapter grads with non-zero B, merged equals unmerged."""

import pytest
import te_emulation
import torch

from megatron_cpu.launch import run_on_ranks
from support import mla_cases
from support.compare import assert_same


def _megatron_core_minor() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("megatron-core").split(".")[:2]
    return int(major), int(minor)


DUPLICATED = ("TELinear", "duplicated")
TE_FUSED_NORM = ("TELayerNormColumnParallelLinear", "column")
LOCAL_COLUMN, LOCAL_ROW = ("ColumnParallelLinear", "column"), ("RowParallelLinear", "row")
# megatron-core 0.19 fuses the q norm into linear_q_proj when q_lora_rank is None (a
# TELayerNormColumnParallelLinear); 0.16 builds a TEColumnParallelLinear there.
TE_Q_PROJ = TE_FUSED_NORM if _megatron_core_minor() >= (0, 19) else ("TEColumnParallelLinear",
                                                                    "column")
EXPECTED = {
    ("te", 32, True): {"linear_q_down_proj": DUPLICATED, "linear_q_up_proj": TE_FUSED_NORM,
                       "linear_kv_down_proj": DUPLICATED, "linear_kv_up_proj": TE_FUSED_NORM,
                       "linear_proj": ("TERowParallelLinear", "row")},
    ("te", None, True): {"linear_q_proj": TE_Q_PROJ, "linear_kv_down_proj": DUPLICATED,
                         "linear_kv_up_proj": TE_FUSED_NORM,
                         "linear_proj": ("TERowParallelLinear", "row")},
    # The local spec's down projections are column-parallel: split, then gathered by MLA.
    ("local", 32, True): {"linear_q_down_proj": LOCAL_COLUMN, "linear_q_up_proj": LOCAL_COLUMN,
                          "linear_kv_down_proj": LOCAL_COLUMN, "linear_kv_up_proj": LOCAL_COLUMN,
                          "linear_proj": LOCAL_ROW},
    ("local", None, False): {"linear_q_proj": LOCAL_COLUMN, "linear_kv_down_proj": LOCAL_COLUMN,
                             "linear_kv_up_proj": LOCAL_COLUMN, "linear_proj": LOCAL_ROW},
}


@pytest.fixture(scope="module")
def variants():
    return run_on_ranks(mla_cases.variant_cases, world_size=2, setup=te_emulation.enable,
                        timeout=600)


@pytest.mark.parametrize("variant", mla_cases.VARIANTS, ids=str)
def test_each_mla_linear_is_built_as_expected_and_carries_lora(variants, variant):
    for rank in variants:
        for tp, sp in mla_cases.VARIANT_LAYOUTS:
            assert rank[(variant, tp, sp)]["classes"] == EXPECTED[variant], (tp, sp)


@pytest.mark.parametrize("variant", mla_cases.VARIANTS, ids=str)
def test_b_zero_is_the_base_and_tp2_sp_is_tp1_and_merged_is_unmerged(variants, variant):
    reference = variants[0][(variant, 1, False)]
    for rank in variants:
        for tp, sp in mla_cases.VARIANT_LAYOUTS:
            got = rank[(variant, tp, sp)]
            assert_same(*got["b0_logits"], f"{variant} TP={tp}: B = 0 vs the plain model")
            torch.testing.assert_close(got["merged_logits"], got["logits"], rtol=0, atol=1e-5)
            torch.testing.assert_close(got["logits"], reference["logits"], rtol=0, atol=1e-5)
            assert got["grads"].keys() == reference["grads"].keys()
            for name, value in reference["grads"].items():  # fp32 rounding of the grads
                assert value.abs().max() > 0, name
                torch.testing.assert_close(got["grads"][name], value, rtol=0,
                                           atol=1e-5 * value.abs().max().item(),
                                           msg=lambda m, name=name, tp=tp: f"TP={tp} {name}: {m}")
