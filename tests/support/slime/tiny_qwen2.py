"""A tiny random Qwen2 as slime starts from it: an HF folder (config, safetensors weights,
tokenizer) and the Megatron flags that describe the same model.

    write_hf_checkpoint(path, dtype=torch.float32)
    MEGATRON_MODEL_ARGS   # slime's scripts/models/qwen2.5-*.sh, scaled down
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 64
FFN = 96
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 64
ROPE_THETA = 10000.0
NORM_EPS = 1e-6

MEGATRON_MODEL_ARGS = [
    "--swiglu", "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
    "--ffn-hidden-size", str(FFN), "--num-attention-heads", str(HEADS),
    "--group-query-attention", "--num-query-groups", str(KV_HEADS),
    "--use-rotary-position-embeddings", "--disable-bias-linear", "--add-qkv-bias",
    "--normalization", "RMSNorm", "--norm-epsilon", str(NORM_EPS),
    "--rotary-base", str(int(ROPE_THETA)), "--vocab-size", str(VOCAB),
    "--untie-embeddings-and-output-weights",
]


def hf_config(dtype=torch.float32):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=ROPE_THETA, rms_norm_eps=NORM_EPS, tie_word_embeddings=False,
        hidden_act="silu", attention_dropout=0.0, torch_dtype=dtype, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tokenizer(size: int = VOCAB):
    """A word-level tokenizer of `size` ids: `<pad>`, `<s>`, `</s>`, then `t3`, `t4`, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<pad>")


def write_hf_checkpoint(path: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """A randomly initialized Qwen2ForCausalLM (biases made non-zero, so the qkv bias path is
    exercised) with its tokenizer, saved as slime's `--hf-checkpoint`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(dtype)).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return path


def hf_model(path: Path, dtype=torch.float32, state: dict | None = None):
    """`Qwen2ForCausalLM` from the folder at `path` (its config), with `state` loaded strictly
    when given (tensors by HF name)."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model
