"""Package boundaries: one shared config class; fsdp_lora works with megatron-core absent."""

import subprocess
import sys


def test_both_backends_share_one_config_class():
    import fsdp_lora
    import lora_common
    import megatron_lora

    assert fsdp_lora.LoRAConfig is megatron_lora.LoRAConfig is lora_common.LoRAConfig


# Runs with megatron blocked: every fsdp_lora verb on a small torch model (no transformers,
# to keep the subprocess fast), through a PEFT adapter folder and back.
FSDP_LORA_WITHOUT_MEGATRON = """
import sys, tempfile
sys.modules["megatron"] = None   # any import of megatron now raises ImportError
import torch
import fsdp_lora as fl

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.out = (torch.nn.Linear(8, 8) for _ in range(3))
    def forward(self, x):
        return self.out(self.q_proj(x) * self.v_proj(x))

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), Block())

x = torch.randn(3, 8)
base = build()
model = fl.apply_lora_to_fsdp_model(
    build(), fl.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
assert torch.equal(model(x), base(x))
params = fl.get_lora_parameters(model)
optimizer = torch.optim.AdamW(params.values(), lr=0.1)
model(x).square().sum().backward()
optimizer.step()
trained = model(x).detach()
assert not torch.allclose(trained, base(x))
with fl.disable_lora(model):
    assert torch.equal(model(x), base(x))
merged = dict(fl.iter_merged_weights(model))
fl.merge_lora_weights(model)
assert torch.allclose(model(x), trained, atol=1e-5)
assert torch.equal(model[0].q_proj.weight, merged["0.q_proj.weight"])
fl.unmerge_lora_weights(model)
folder = tempfile.mkdtemp()
fl.save_peft_adapter(model, folder)
fresh = fl.apply_lora_to_fsdp_model(
    build(), fl.LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
fl.load_peft_adapter(fresh, folder)
assert torch.allclose(fresh(x), trained, atol=1e-6)
assert sys.modules["megatron"] is None and not any(m.startswith("megatron.") for m in sys.modules)
print(sorted(params), sorted(merged))
"""


def test_fsdp_lora_works_without_megatron_core():
    result = subprocess.run([sys.executable, "-c", FSDP_LORA_WITHOUT_MEGATRON],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = [f"{b}.{m}.{p}" for b in "01" for m in ("out", "q_proj", "v_proj")
             for p in ("bias", "weight")]
    lora = [f"{b}.{m}.lora_{f}.weight" for b in "01" for m in ("q_proj", "v_proj") for f in "AB"]
    assert result.stdout.strip() == f"{sorted(lora)} {sorted(names)}"


# Runs with megatron blocked: the offline tools on an adapter checkpoint written without a model.
OFFLINE_TOOLS_WITHOUT_MEGATRON = """
import sys, tempfile, torch
sys.modules["megatron"] = None   # any import of megatron now raises ImportError
from lora_common import LoRAConfig
from megatron_lora.cli import main
from megatron_lora.interop.adapter_file import AdapterCheckpoint, write_adapter_checkpoint
from megatron_lora.interop.geometry import Geometry

geometry = Geometry(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1,
                    kv_channels=4, ffn_hidden_size=6)
name = "decoder.layers.0.self_attention.linear_qkv"
tensors = {f"{name}.lora_A.weight": torch.ones(2, 8), f"{name}.lora_B.weight": torch.ones(16, 2)}
config = LoRAConfig(r=2, alpha=4, target_modules=["linear_qkv"])
folder = tempfile.mkdtemp()
write_adapter_checkpoint(AdapterCheckpoint(tensors, config, geometry), f"{folder}/a.safetensors")
assert main(["inspect", f"{folder}/a.safetensors"]) == 0
assert main(["export-peft", f"{folder}/a.safetensors", f"{folder}/peft"]) == 0
assert main(["inspect", f"{folder}/peft"]) == 0
assert not any(m == "megatron" or m.startswith("megatron.") for m in sys.modules
               if sys.modules[m] is not None)
"""


def test_offline_export_and_inspect_work_without_megatron_core():
    result = subprocess.run([sys.executable, "-c", OFFLINE_TOOLS_WITHOUT_MEGATRON],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "k_proj q_proj v_proj" in result.stdout  # the PEFT folder adapts q, k and v
