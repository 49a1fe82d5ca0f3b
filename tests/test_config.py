"""LoRAConfig validation, the --lora-* flags, and the config round trips."""

import argparse
import json
import math

import pytest
import yaml

from lora_common import HF_TARGET_MODULES, MEGATRON_TARGET_MODULES, LoRAConfig, add_lora_arguments


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", -4), ("r", 2.5), ("r", True), ("r", "8"),
    ("alpha", 0), ("alpha", -1.0), ("alpha", math.inf), ("alpha", math.nan), ("alpha", "16"),
    ("dropout", -0.1), ("dropout", 1.0), ("dropout", 1.5),
    ("target_modules", []), ("target_modules", ""),
    ("init", "xavier"), ("seed", 1.5), ("use_rslora", "yes"), ("only_trainable", 1),
])
def test_bad_value_names_its_field(field, value):
    with pytest.raises(ValueError, match=rf"LoRAConfig\.{field}"):
        LoRAConfig(**{field: value})


def test_target_that_is_also_excluded_is_rejected():
    with pytest.raises(ValueError, match=r"exclude_modules.*linear_fc2"):
        LoRAConfig(target_modules=["linear_qkv", "linear_fc2"], exclude_modules=["linear_fc2"])


def test_scaling_plain_and_rslora():
    assert LoRAConfig(r=8, alpha=16).scaling == 2.0
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0


def test_targets_resolve_to_the_backend_default_only_when_unset():
    assert (LoRAConfig().resolve_targets(MEGATRON_TARGET_MODULES).target_modules
            == MEGATRON_TARGET_MODULES)
    assert LoRAConfig().resolve_targets(HF_TARGET_MODULES).target_modules == HF_TARGET_MODULES
    mine = LoRAConfig(target_modules="linear_qkv, linear_proj")
    assert mine.target_modules == ("linear_proj", "linear_qkv")  # a set, kept sorted
    assert mine.resolve_targets(MEGATRON_TARGET_MODULES) is mine


def test_dict_round_trip_through_json():
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["linear_qkv"],
                        exclude_modules=["decoder.layers.0.self_attention.linear_qkv"],
                        use_rslora=True, init="gaussian", only_trainable=False, seed=7)
    assert LoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAConfig.from_dict({"lora_rank": 8})


def parse(*argv):
    return add_lora_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_flag_defaults_build_the_default_config():
    args = parse()
    assert args.use_lora is False and args.lora_base_spec is None
    assert LoRAConfig.from_args(args) == LoRAConfig()


def test_every_flag_reaches_the_config():
    args = parse("--use-lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.05",
                 "--lora-target-modules", "linear_qkv", "linear_fc1",
                 "--lora-exclude-modules", "linear_fc2", "--no-lora-only-trainable",
                 "--lora-rslora", "--lora-init", "gaussian", "--lora-seed", "3",
                 "--lora-canonical", "--lora-base-spec", "my.module", "my_spec")
    assert args.use_lora and args.lora_base_spec == ["my.module", "my_spec"]
    assert LoRAConfig.from_args(args) == LoRAConfig(
        r=4, alpha=8.0, dropout=0.05, target_modules=("linear_qkv", "linear_fc1"),
        exclude_modules=("linear_fc2",), only_trainable=False, use_rslora=True,
        init="gaussian", seed=3, canonical=True)


def test_no_forms_turn_booleans_off_and_on():
    assert parse("--lora-canonical", "--no-lora-canonical").lora_canonical is False
    assert parse("--no-lora-only-trainable").lora_only_trainable is False
    assert parse("--no-lora-only-trainable", "--lora-only-trainable").lora_only_trainable is True
    assert parse("--use-lora", "--no-use-lora").use_lora is False
    assert parse("--lora-rslora", "--no-lora-rslora").lora_rslora is False
    assert parse("--lora-r", "8").lora_r == 8


def test_bad_flag_values_are_rejected():
    with pytest.raises(SystemExit):
        parse("--lora-init", "xavier")
    with pytest.raises(ValueError, match=r"LoRAConfig\.r"):
        LoRAConfig.from_args(parse("--lora-r", "0"))


def test_lora_seed_falls_back_to_megatron_seed():
    args = parse()
    args.seed = 1234  # Megatron's --seed
    assert LoRAConfig.from_args(args).seed == 1234
    assert LoRAConfig.from_args(parse("--lora-seed", "5")).seed == 5


def test_round_trip_namespace_config_dict_config():
    config = LoRAConfig.from_args(parse("--lora-r", "2", "--lora-target-modules", "linear_proj"))
    assert LoRAConfig.from_dict(config.to_dict()) == config


def test_yaml_keys_of_the_same_names_work(tmp_path):
    # slime's --custom-config-path does setattr(args, key, value) for each YAML key.
    path = tmp_path / "lora.yaml"
    path.write_text("lora_r: 8\nlora_alpha: 16\nlora_target_modules: linear_qkv,linear_proj\n"
                    "lora_only_trainable: false\n")
    args = argparse.Namespace()
    for key, value in yaml.safe_load(path.read_text()).items():
        setattr(args, key, value)
    config = LoRAConfig.from_args(args)
    assert (config.r, config.alpha, config.only_trainable) == (8, 16, False)
    assert config.target_modules == ("linear_proj", "linear_qkv")


def test_flags_do_not_clash_with_megatron():
    # Megatron-LM's parser owns --q-lora-rank and --kv-lora-rank (MLA); read from
    # megatron/training/arguments.py at slime's pinned 1dcf0daf and at current main, no other
    # option there contains "lora". argparse raises on a duplicate option string, so adding
    # ours next to those proves no clash; with Megatron-LM installed, next to all of its flags.
    parser = argparse.ArgumentParser(allow_abbrev=False)  # Megatron's parser setting
    try:
        from megatron.training.arguments import add_megatron_arguments
    except ImportError:  # megatron-core wheels do not ship megatron.training
        parser.add_argument("--q-lora-rank", type=int)
        parser.add_argument("--kv-lora-rank", type=int)
    else:  # pragma: no cover - only where Megatron-LM is installed from source
        parser = add_megatron_arguments(parser)
    add_lora_arguments(parser)
    args, _ = parser.parse_known_args(["--q-lora-rank", "64", "--lora-rank", "8", "--lora-r", "4"])
    assert args.q_lora_rank == 64 and args.lora_r == 4


def slime_lora_parser(**overrides):
    """A parser that defines LoRA flags of its own before ours, as slime's PR #1865 does
    (`--lora-rank`, `--lora-alpha`, `--lora-dropout`, `--lora-target-modules`); `overrides`
    replace one definition: `{"--lora-rank": dict(type=float)}`."""
    definitions = {"--lora-rank": dict(type=int, default=0),
                   "--lora-alpha": dict(type=int, default=16),
                   "--lora-dropout": dict(type=float, default=0.0),
                   "--lora-target-modules": dict(type=str, nargs="+", default=None)}
    definitions.update(overrides)
    parser = argparse.ArgumentParser(allow_abbrev=False)
    for flag, options in definitions.items():
        parser.add_argument(flag, **options)
    return parser


def test_flags_already_defined_with_the_same_meaning_are_reused():
    parser = add_lora_arguments(slime_lora_parser())
    args = parser.parse_args(["--use-lora", "--lora-rank", "8", "--lora-alpha", "32",
                              "--lora-target-modules", "linear_qkv", "linear_proj"])
    # slime reads its own names, we read the config: one value each
    assert (args.lora_rank, args.lora_alpha, args.lora_target_modules) == (
        8, 32, ["linear_qkv", "linear_proj"])
    config = LoRAConfig.from_args(args)
    assert (config.r, config.alpha, config.target_modules) == (8, 32, ("linear_proj",
                                                                       "linear_qkv"))
    assert not hasattr(args, "lora_r")  # no second copy that could disagree
    # our other spelling stores into the parser's value; the parser's defaults stay
    args = parser.parse_args(["--lora-r", "4"])
    assert args.lora_rank == 4 and LoRAConfig.from_args(args).r == 4
    args = parser.parse_args([])
    assert (args.lora_rank, args.lora_alpha) == (0, 16)
    with pytest.raises(ValueError, match=r"LoRAConfig\.r"):  # slime's default rank 0 is no rank
        LoRAConfig.from_args(args)
    # our own flags beside them work as before
    assert parser.parse_args(["--lora-canonical"]).lora_canonical is True


@pytest.mark.parametrize("flag, definition", [
    ("--lora-rank", dict(type=float)),
    ("--lora-target-modules", dict(type=str, default="all-linear")),   # one string, not a list
    ("--lora-dropout", dict(action="store_true")),
])
def test_a_flag_defined_with_another_meaning_is_refused_by_name(flag, definition):
    parser = slime_lora_parser(**{flag: definition})
    before = dict(parser._option_string_actions)
    with pytest.raises(ValueError, match=rf"^{flag}: the parser already defines it"):
        add_lora_arguments(parser)
    assert parser._option_string_actions == before  # nothing was added


def test_two_of_our_spellings_defined_as_different_flags_are_refused():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-rank", type=int)
    with pytest.raises(ValueError, match=r"--lora-r/--lora-rank: the parser already defines "
                                         r"\['--lora-r', '--lora-rank'\] as different flags"):
        add_lora_arguments(parser)
