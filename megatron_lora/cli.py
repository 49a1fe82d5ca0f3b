"""The `megatron-lora` command.

    megatron-lora demo [--steps N] [--tp N] [--out DIR]           a LoRA fine-tune on CPU
    megatron-lora demo-rl [--steps N] [--lora-sync MODE] [--out DIR]   LoRA RL, live SGLang
    megatron-lora export-peft CHECKPOINT OUT [--base-model NAME]   adapter checkpoint -> PEFT
    megatron-lora inspect PATH                                     adapter checkpoint or PEFT dir
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _export_peft(args: argparse.Namespace) -> int:
    from megatron_lora.interop import architectures
    from megatron_lora.interop.adapter_file import read_lora_checkpoint
    from megatron_lora.interop.peft_export import architecture_warnings, export_checkpoint

    arch = architectures.architecture(args.architecture)  # an unknown one is refused by name
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; export into a new folder")
    checkpoint = read_lora_checkpoint(args.checkpoint)
    export_checkpoint(checkpoint, out, base_model_name_or_path=args.base_model,
                      architecture=args.architecture, expand_shared=args.expand_shared_experts)
    for note in architecture_warnings(arch, checkpoint.config.target_modules):  # once it fits
        print(f"megatron-lora export-peft: warning: {note}", file=sys.stderr)
    print(f"wrote the PEFT adapter to {args.out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from megatron_lora.demos.supervised import main

    return main(args)


def _demo_rl(args: argparse.Namespace) -> int:
    from megatron_lora.demos.rl import main

    return main(args)


def describe(path: str | Path) -> list[tuple[str, str]]:
    """(field, value) lines describing an adapter checkpoint file or a PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        from lora_common.peft_files import read_peft_adapter

        adapter = read_peft_adapter(path)
        layers = sorted({int(name.split(".layers.")[1].split(".")[0])
                         for name in adapter.adapters if ".layers." in name})
        params = sum(a.numel() + b.numel() for a, b in adapter.adapters.values())
        return [("format", "PEFT LoRA adapter"), ("r", str(adapter.config["r"])),
                ("alpha", str(adapter.config["lora_alpha"])),
                ("rslora", str(adapter.config.get("use_rslora", False))),
                ("targets", " ".join(adapter.config["target_modules"])),
                ("adapted modules", str(len(adapter.adapters))),
                ("parameters", f"{params:,}"),
                ("layers", f"{len(layers)} ({layers[0]}..{layers[-1]})" if layers else "?"),
                _hidden_size(adapter.adapters),
                ("base model", str(adapter.config.get("base_model_name_or_path")))]
    from megatron_lora.interop.adapter_file import read_lora_checkpoint

    checkpoint = read_lora_checkpoint(path)
    config, geometry = checkpoint.config, checkpoint.geometry
    params = sum(t.numel() for t in checkpoint.tensors.values())
    return [("format", "megatron-lora adapter checkpoint"), ("r", str(config.r)),
            ("alpha", str(config.alpha)), ("rslora", str(config.use_rslora)),
            ("targets", " ".join(config.target_modules or ())),
            ("excluded", " ".join(config.exclude_modules) or "-"),
            ("adapted modules", str(len(checkpoint.tensors) // 2)),
            ("parameters", f"{params:,}"),
            *[(field, str(value)) for field, value in geometry.to_dict().items()]]


def _hidden_size(adapters: dict) -> tuple[str, str]:
    """The hidden size a PEFT folder shows: A's input of a module that reads the hidden state
    (q_proj, gate_proj, ...; HF leaf names of every known architecture), named; else the input
    of the first module, named, for it is not the hidden size (down_proj's is the ffn width)."""
    from megatron_lora.interop import hf_experts, hf_mapping
    from megatron_lora.interop.architectures import ARCHITECTURES

    leaves = {leaf for target in hf_mapping.HIDDEN_INPUT_TARGETS
              for leaf in hf_mapping.hf_leaves(target)}
    leaves |= {leaf for a in ARCHITECTURES.values() if a.moe
               for leaf in hf_experts.leaves(a.moe, "linear_fc1")}
    modules = sorted(adapters)
    module = next((m for m in modules if m.rsplit(".", 1)[-1] in leaves), None)
    if module is None:
        return f"A's input of {modules[0]}", str(adapters[modules[0]][0].shape[1])
    return f"hidden (A's input of {module.rsplit('.', 1)[-1]})", str(adapters[module][0].shape[1])


def _inspect(args: argparse.Namespace) -> int:
    lines = describe(args.path)
    width = max(len(field) for field, _ in lines)
    for field, value in lines:
        print(f"{field:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-lora", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from megatron_lora.demos.supervised import add_demo_arguments

    demo = commands.add_parser("demo", help="train a small GPT with LoRA on CPU (TP=2 + SP)")
    add_demo_arguments(demo)
    demo.set_defaults(run=_demo)

    from megatron_lora.demos.rl import add_demo_rl_arguments

    demo_rl = commands.add_parser("demo-rl", help="LoRA RL (GRPO) on CPU against a live SGLang "
                                                  "server (TP=2 + SP)")
    add_demo_rl_arguments(demo_rl)
    demo_rl.set_defaults(run=_demo_rl)

    export = commands.add_parser("export-peft", help="convert an adapter checkpoint to PEFT")
    export.add_argument("checkpoint",
                        help="adapter checkpoint (.safetensors) from save_lora_checkpoint")
    export.add_argument("out",
                        help="folder to write adapter_config.json and adapter_model.safetensors")
    export.add_argument("--base-model", default=None, help="base_model_name_or_path to record")
    export.add_argument("--architecture", default="LlamaForCausalLM",
                        help="HF architecture of the base model (Llama family, "
                             "Qwen3MoeForCausalLM, MixtralForCausalLM, DeepseekV3ForCausalLM)")
    export.add_argument("--expand-shared-experts", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="write shared-outer expert factors into every expert (the "
                             "per-expert form vLLM and PEFT read) instead of SGLang's shared form")
    export.set_defaults(run=_export_peft)

    inspect = commands.add_parser("inspect", help="describe an adapter checkpoint or PEFT folder")
    inspect.add_argument("path")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # a user's mistake: one line, no traceback
        print(f"megatron-lora {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: each verb has already stopped what it started
        print(f"megatron-lora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
