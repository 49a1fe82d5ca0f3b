"""A small random HuggingFace Llama (GQA, SwiGLU, RMSNorm, RoPE) and token batches for the
fsdp_lora tests. Built from a config, no download; the same seed gives the same weights."""

from __future__ import annotations

import torch

VOCAB = 96
SEQ = 12
BATCH = 4  # split 2 + 2 across the data-parallel ranks


def llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, attention_dropout=0.0)
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_llama(seed: int = 0, device: str | torch.device = "cpu", **overrides):
    """A random `LlamaForCausalLM`; `device="meta"` builds it without memory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(**overrides))
    return model.eval()


def token_batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    """`steps` batches of token ids [BATCH, SEQ], the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(steps)]


def randomize_lora(model, seed: int = 3) -> None:
    """Give every LoRA factor (B included) random values, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
