"""The entry points Megatron launchers call by name: `--spec megatron_lora get_gpt_lora_spec`
and slime's `--custom-megatron-init-path megatron_lora.custom_megatron_init`.

slime's model provider imports the function named by `--spec` and calls it as
`fn(args, config, vp_stage)`; the returned spec replaces the default one. Without
`--lora-base-spec`, the base is the spec slime (and Megatron-LM) would build by default.

Megatron resolves `--spec` with `vars(module)[name]`, so `megatron_lora` binds these names
eagerly; this module therefore imports megatron only inside its functions, which run once
Megatron is initialized (`import megatron_lora` itself needs no megatron-core).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from lora_common import MEGATRON_TARGET_MODULES, LoRAConfig
from lora_common.state import ADAPTER_PARAMETER_PATTERN


def gpt_lora_spec(
    config: Any,
    lora: LoRAConfig | None = None,
    *,
    use_transformer_engine: bool | None = None,
    num_experts: int | None = None,
    vp_stage: int | None = None,
    **layer_spec_kwargs: Any,
) -> Any:
    """The plain-Python form: Megatron's default GPT spec for `config` (a TransformerConfig),
    with LoRA. TE spec when Transformer Engine imports (unless `use_transformer_engine` says
    otherwise); the MoE decoder block spec when `num_experts` is set. Extra keyword arguments go
    to Megatron's layer-spec function (e.g. `qk_layernorm=True`)."""
    from megatron_lora.adapt import moe
    from megatron_lora.adapt.spec import lora_spec

    lora = lora or LoRAConfig()
    moe.check_moe_config(config, lora.resolve_targets(MEGATRON_TARGET_MODULES))
    spec = lora_spec(
        default_gpt_spec(config, use_transformer_engine=use_transformer_engine,
                         num_experts=num_experts, vp_stage=vp_stage, **layer_spec_kwargs),
        lora,
    )
    return block_form_with_mtp(spec, config, vp_stage)


def get_gpt_lora_spec(args: Any, config: Any, vp_stage: int | None = None) -> Any:
    """`--spec megatron_lora get_gpt_lora_spec`: the base spec (from `--lora-base-spec MODULE
    FUNCTION`, called like `--spec` functions, or Megatron's default GPT spec) with LoRA
    configured by the `--lora-*` flags."""
    from megatron_lora.adapt import moe
    from megatron_lora.adapt.spec import lora_spec

    lora = LoRAConfig.from_args(args)
    moe.check_moe_config(config, lora.resolve_targets(MEGATRON_TARGET_MODULES))
    base_spec = getattr(args, "lora_base_spec", None)
    if base_spec:
        base = _import_base_spec(base_spec)
        if callable(base):
            base = base(args, config, vp_stage)
        return block_form_with_mtp(lora_spec(base, lora), config, vp_stage)
    use_te = None
    if getattr(args, "transformer_impl", "transformer_engine") != "transformer_engine":
        use_te = False
    spec_flags = {name: getattr(args, name, None) for name in
                  ("moe_grouped_gemm", "qk_layernorm", "multi_latent_attention",
                   "moe_use_legacy_grouped_gemm")}
    return gpt_lora_spec(config, lora, use_transformer_engine=use_te,
                         num_experts=getattr(args, "num_experts", None), vp_stage=vp_stage,
                         **spec_flags)


def block_form_with_mtp(spec: Any, config: Any, vp_stage: int | None = None) -> Any:
    """With MTP layers (`config.mtp_num_layers`), a layer spec in the decoder block form.

    Launchers hand the decoder spec to megatron-core's `get_gpt_mtp_block_spec`, which takes a
    block spec or a layer spec whose class *is* `TransformerLayer` (`==`, "Invalid spec"
    otherwise): the LoRA layer class is a subclass. The block form is what `TransformerBlock`
    builds from a layer spec anyway (megatron-core's `_get_block_submodules`: this stage's
    layers and its final norm), so the decoder is the same model; megatron-core's own MoE path
    hands over that form too. Without MTP the spec is returned as it is."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import _get_block_submodules

    if not getattr(config, "mtp_num_layers", None) or not isinstance(spec, ModuleSpec):
        return spec
    return _get_block_submodules(config, spec, vp_stage=vp_stage)


def _import_base_spec(base_spec) -> Any:
    """What `--lora-base-spec MODULE NAME` names (a spec, or a function returning one), as
    Megatron's `--spec` would resolve it, with errors that name the flag."""
    if len(base_spec) != 2:
        raise ValueError(f"--lora-base-spec takes MODULE FUNCTION, got {base_spec!r}")
    module_name, name = base_spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--lora-base-spec {module_name} {name}: cannot import module "
                         f"{module_name!r} ({error})") from error
    if name not in vars(module):
        raise ValueError(f"--lora-base-spec {module_name} {name}: module {module_name!r} has no "
                         f"{name!r}")
    return vars(module)[name]


def default_gpt_spec(config: Any, *, use_transformer_engine: bool | None = None,
                     num_experts: int | None = None, vp_stage: int | None = None,
                     **layer_spec_kwargs: Any) -> Any:
    """The spec slime's model provider builds when `--spec` is not given."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = te_available()
    # Pass only flags that are set: megatron-core 0.19 dropped some of 0.16's arguments
    # (moe_use_legacy_grouped_gemm), whose default was off.
    flags = {k: v for k, v in layer_spec_kwargs.items() if v}
    if num_experts:
        kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_transformer_engine, **kwargs)
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**flags)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=config.normalization, **flags)


def te_available() -> bool:
    """Whether megatron-core found Transformer Engine when it was imported."""
    from megatron.core.models.gpt import gpt_layer_specs

    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def custom_megatron_init(args: argparse.Namespace) -> None:
    """For slime's `--custom-megatron-init-path megatron_lora.custom_megatron_init`.

    slime calls it at the end of Megatron's initialization, before any model is built. With
    `--use-lora` it points `--spec` at `get_gpt_lora_spec` (a `--spec` the user set becomes
    `--lora-base-spec`, the base that LoRA wraps) and, with `--lora-only-trainable`, tells
    slime's own freezing step (`--only-train-params-name-list`) to keep only the adapters
    trainable, which also freezes the embedding and output layer that the layer spec does not
    reach.
    """
    if not getattr(args, "use_lora", False):
        return
    config = LoRAConfig.from_args(args)  # validate the flags early, with a clear error
    ours = ["megatron_lora", "get_gpt_lora_spec"]
    spec = list(args.spec) if getattr(args, "spec", None) else None
    if spec and spec != ours:
        if getattr(args, "lora_base_spec", None):
            raise ValueError(f"--use-lora: both --spec {' '.join(spec)} and --lora-base-spec "
                             f"are set; give the base spec once, as --lora-base-spec")
        args.lora_base_spec = spec  # LoRA wraps the spec the user chose
    args.spec = ours
    if config.only_trainable:
        args.only_train_params_name_list = [ADAPTER_PARAMETER_PATTERN]
