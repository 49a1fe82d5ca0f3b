"""Package boundaries: one shared config class; fsdp_lora works with megatron-core absent."""

import subprocess
import sys


def test_both_backends_share_one_config_class():
    import fsdp_lora
    import lora_common
    import megatron_lora

    assert fsdp_lora.LoRAConfig is megatron_lora.LoRAConfig is lora_common.LoRAConfig


def test_fsdp_lora_imports_without_megatron_core():
    # `sys.modules["megatron"] = None` makes any import of megatron raise ImportError.
    code = ("import sys; sys.modules['megatron'] = None\n"
            "import fsdp_lora\n"
            "print(fsdp_lora.LoRAConfig(r=4).scaling)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8.0"
