"""HF checkpoints as slime starts from them, for any of the tiny models (`tiny_qwen2`,
`tiny_qwen3_moe`, `tiny_deepseek_v3`): the folder (config, safetensors weights, tokenizer), the
tensor names it holds, and the HF model it is, from the folder or from tensors a sync sent.

    write(path, config, dtype, seed, redraw)   # a random model saved as slime's --hf-checkpoint
    tensor_names(path)                         # what save_pretrained wrote (per-expert names)
    hf_model(path, dtype, state)               # HF's own loading of the folder, or of `state`

transformers 5 holds MoE experts fused in memory (`mlp.experts.gate_up_proj [E, 2F, H]`) and
saves them per expert (`mlp.experts.{e}.gate_proj.weight`), the names slime's converters read
and write: `state` is therefore loaded the way a checkpoint is, through `from_pretrained`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 128


def tokenizer():
    """A word-level tokenizer of the tiny vocabulary: `<pad>`, `<s>`, `</s>`, then `t3`, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<pad>")


def write(path: Path, config, dtype=torch.float32, seed: int = 0,
          redraw: Callable[[str, torch.Tensor, torch.Generator], torch.Tensor | None] = None
          ) -> Path:
    """A random `AutoModelForCausalLM` of `config` with its tokenizer, saved at `path`.
    `redraw(name, param, generator)` may return a new value for a parameter (or None)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            new = redraw(name, param, generator) if redraw else None
            if new is not None:
                param.copy_(new)
        for name, buffer in model.named_buffers():
            new = redraw(name, buffer, generator) if redraw else None
            if new is not None:
                buffer.copy_(new)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return path


def _randn(param, generator) -> torch.Tensor:
    return torch.randn(param.shape, generator=generator).to(param.dtype)


def moe_redraw(name, param, generator):
    """For `write`'s `redraw` of an MoE model: experts at unit output variance and a router
    that spreads tokens decisively over them (near-ties would let rounding pick the expert), a
    router expert bias (DeepSeek-V3's: it picks the experts but does not weigh them) non-zero,
    norms near one."""
    if name.endswith("e_score_correction_bias"):
        return _randn(param, generator) * 0.1
    if name.endswith("mlp.gate.weight") or (param.dim() == 3 and ".experts." in name):
        return _randn(param, generator) / param.shape[-1] ** 0.5
    if "norm" in name:
        return param + _randn(param, generator) * 0.1
    return None


def read_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def tensor_names(path) -> set[str]:
    return set(read_tensors(path))


def hf_model(path: Path, dtype=torch.float32, state: dict | None = None):
    """The HF model of the folder at `path` (its config and weights), or with `state` (tensors
    by their checkpoint names) as its weights: every tensor of the checkpoint's names present,
    none left over."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if state is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    names = tensor_names(path)
    if set(state) != names:
        raise ValueError(f"tensors {sorted(set(state) ^ names)} are not the checkpoint's")
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(Path(path) / "config.json", folder)
        save_file({n: t.contiguous() for n, t in state.items()},
                  os.path.join(folder, "model.safetensors"))
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                           output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"loading the tensors into HF: {problems}")
    return model.eval()
