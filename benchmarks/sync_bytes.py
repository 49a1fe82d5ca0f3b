"""Bytes per weight sync to a rollout engine, merged model vs adapter only, and the time to
produce each.

`--lora-sync merged` sends every parameter of the model each sync (`W + s B A` merged in);
`--lora-sync adapter` sends the base once and then only the adapter in PEFT form: per adapted HF
linear an A `[r, in]` and a B `[out, r]` (Megatron's fused `linear_qkv` / `linear_fc1` split into
q/k/v and gate/up, each with its own copy of A, as SGLang and PEFT take them). Both in bf16.

- `geometry` rows: computed from the HF configs of Qwen3-8B, Qwen3-32B and Qwen3-30B-A3B (its
  128 experts' gate/up/down adapted per expert, as the per-expert export writes them).
- `measured` rows: a small model built here (Megatron GPT, TP=1), the same formula against the
  bytes actually produced: `merged_weights` over a CPU copy of the parameters, and
  `gather_peft_adapter` over the same copy (and its SGLang payload, base64 included).
- `measured_moe` rows: Qwen3-30B-A3B's own geometry (hidden 2048, 32 heads, 4 kv heads of 128,
  128 experts of ffn 768, vocabulary 151936) built in Megatron at 1 and at 2 layers (bf16,
  weights left uninitialized: only their bytes count), every linear adapted, each expert its own
  adapter: the bytes `merged_weights` and `gather_peft_adapter(architecture=
  "Qwen3MoeForCausalLM")` (what `--lora-sync adapter` sends SGLang) produce, and the SGLang
  payload; the 48-layer counts are the 1-layer count plus 47 times the second layer's (every
  layer is the same), beside the formula.
- `timing` rows: producing the adapter (gather, PEFT split, SGLang payload) vs reading the
  merged stream (each merged tensor materialized), median of turns.

    python -m benchmarks.sync_bytes [--quick]
"""

from __future__ import annotations

import dataclasses

import torch

from benchmarks import common
from benchmarks.common import Column

BF16 = 2  # bytes


@dataclasses.dataclass(frozen=True)
class Model:
    """What the byte counts need of an HF Qwen3 config."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int        # dense MLP (or each expert's, with experts)
    vocab: int
    experts: int = 0
    tied: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each HF linear of one layer that LoRA adapts (per expert: x experts)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv),
                "v_proj": (self.hidden, kv), "o_proj": (q, self.hidden)}
        mlp = {"gate_proj": (self.hidden, self.intermediate),
               "up_proj": (self.hidden, self.intermediate),
               "down_proj": (self.intermediate, self.hidden)}
        return {**attn, **mlp}

    def parameters(self) -> int:
        """Every parameter (what a merged sync sends): embeddings, head, norms, linears."""
        per_layer = 0
        for leaf, (n_in, n_out) in self.linears().items():
            per_layer += n_in * n_out * (self.experts if self.experts and "proj" in leaf
                                         and leaf in ("gate_proj", "up_proj", "down_proj") else 1)
        per_layer += 2 * self.hidden + 2 * self.head_dim  # layer norms, q/k norms
        if self.experts:
            per_layer += self.experts * self.hidden  # the router
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def fused_adapter_parameters(self, r: int) -> int:
        """The adapter as Megatron trains it: one A for the fused q/k/v and one for gate/up."""
        (h, q), (_, kv), (_, _), (o_in, _) = (self.linears()[k] for k in
                                             ("q_proj", "k_proj", "v_proj", "o_proj"))
        attention = r * (h + q + 2 * kv) + r * (o_in + h)
        mlp = r * (h + 2 * self.intermediate) + r * (self.intermediate + h)
        return self.layers * (attention + mlp * (self.experts or 1))

    def adapter_parameters(self, r: int) -> int:
        """The PEFT adapter on every linear of every layer (A copied to q/k/v and gate/up)."""
        per_layer = 0
        for leaf, (n_in, n_out) in self.linears().items():
            copies = self.experts if self.experts and leaf in ("gate_proj", "up_proj",
                                                               "down_proj") else 1
            per_layer += copies * r * (n_in + n_out)
        return self.layers * per_layer


# From the models' HF config.json files.
QWEN3 = (
    Model("Qwen3-8B", layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128,
          intermediate=12288, vocab=151936),
    Model("Qwen3-32B", layers=64, hidden=5120, heads=64, kv_heads=8, head_dim=128,
          intermediate=25600, vocab=151936),
    Model("Qwen3-30B-A3B", layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128,
          intermediate=768, vocab=151936, experts=128),
)

GEOMETRY_COLUMNS = [
    Column("model", "model"), Column("r", "r"),
    Column("merged GB / sync", "merged_GB", "{:.2f}"),
    Column("adapter MB / sync", "adapter_MB", "{:.1f}"),
    Column("adapter / merged", "ratio", "{:.2%}", bold=True),
    Column("trained (fused) adapter / model", "fused_ratio", "{:.2%}"),
    Column("note", "note"),
]
MEASURED_COLUMNS = [
    Column("model", "model"), Column("r", "r"),
    Column("merged bytes (formula)", "merged_formula"),
    Column("merged bytes (measured)", "merged_measured"),
    Column("adapter bytes (formula)", "adapter_formula"),
    Column("adapter bytes (measured)", "adapter_measured"),
    Column("payload bytes (base64)", "payload_bytes"),
    Column("adapter / merged", "ratio", "{:.2%}", bold=True),
]
TIMING_COLUMNS = [
    Column("model", "model"), Column("r", "r"),
    Column("merged stream ms", "merged_ms", "{:.1f}"),
    Column("adapter tensors ms", "adapter_ms", "{:.1f}"),
    Column("+ SGLang payload ms", "payload_ms", "{:.1f}"),
    Column("adapter+payload / merged", "time_ratio", "{:.3f}", bold=True),
    Column("spread", "spread", "{:.0%}"),
]
TABLES = {"geometry": GEOMETRY_COLUMNS, "measured": MEASURED_COLUMNS, "timing": TIMING_COLUMNS,
          "measured_moe": MEASURED_COLUMNS}  # the MoE rows measure the same quantities


def geometry_rows(ranks=(16, 64)) -> list[dict]:
    rows = []
    for model in QWEN3:
        for r in ranks:
            merged, adapter = model.parameters() * BF16, model.adapter_parameters(r) * BF16
            rows.append({"model": model.name, "r": r, "merged_GB": merged / 1e9,
                         "adapter_MB": adapter / 1e6, "ratio": adapter / merged,
                         "fused_ratio": model.fused_adapter_parameters(r) * BF16 / merged,
                         "note": "per-expert export; measured: measured_moe" if model.experts
                         else ""})
    return rows


def small_model(hidden: int, layers: int, r: int):
    """A Megatron GPT in bf16 with LoRA on every linear (non-zero B), and its HF twin's counts."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_lora import LoRAConfig, get_lora_parameters, lora_spec

    heads, groups, head_dim, vocab = hidden // 64, max(1, hidden // 256), 64, 1024
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=head_dim, ffn_hidden_size=3 * hidden,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, qk_layernorm=True,
        use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True)
    spec = lora_spec(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True),
                     LoRAConfig(r=r, alpha=2 * r))
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=64,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    model.to(torch.bfloat16)  # the torch norms of the local spec are built in fp32
    with torch.no_grad():
        for name, param in get_lora_parameters(model).items():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.01)
    twin = Model(f"small (hidden {hidden}, {layers} layers)", layers=layers, hidden=hidden,
                 heads=heads, kv_heads=groups, head_dim=head_dim, intermediate=3 * hidden,
                 vocab=vocab)
    return model, twin


def measure_small(hidden: int, layers: int, r: int, rounds: int) -> tuple[dict, dict]:
    from megatron_lora import gather_peft_adapter, merged_weights
    from megatron_lora.interop import sglang

    model, twin = small_model(hidden, layers, r)
    # slime's CPU backup: every parameter, under its global name
    backup = {f"module.module.{n}": p.detach().clone() for n, p in model.named_parameters()}

    def merged_stream():
        view = merged_weights(backup, model)
        return sum(view[name].numel() * view[name].element_size() for name in view)

    def adapter_tensors():
        return gather_peft_adapter(backup, model)

    def adapter_payload():
        adapter = gather_peft_adapter(backup, model)
        return sglang.encode_tensors(adapter.tensors())

    merged_bytes = merged_stream()
    adapter = adapter_tensors()
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.tensors().values())
    payload = adapter_payload()
    measured = {"model": twin.name, "r": r,
                "merged_formula": twin.parameters() * BF16, "merged_measured": merged_bytes,
                "adapter_formula": twin.adapter_parameters(r) * BF16,
                "adapter_measured": adapter_bytes, "payload_bytes": len(payload),
                "ratio": adapter_bytes / merged_bytes}
    samples = common.time_in_turns({"merged": merged_stream, "adapter": adapter_tensors,
                                    "payload": adapter_payload}, rounds=rounds, warmup=1)
    seconds = {name: common.median(s.wall) for name, s in samples.items()}
    timing = {"model": twin.name, "r": r, "merged_ms": seconds["merged"] * 1e3,
              "adapter_ms": seconds["adapter"] * 1e3, "payload_ms": seconds["payload"] * 1e3,
              "time_ratio": seconds["payload"] / seconds["merged"],
              "spread": max(common.spread(s.wall) for s in samples.values())}
    return measured, timing


def moe_model(like: Model, layers: int, r: int):
    """A Megatron MoE GPT of `like`'s geometry with `layers` layers in bf16, LoRA (per-expert
    layout) on every linear; weights uninitialized (torch.empty): only their bytes are read."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_lora import LoRAConfig, lora_spec

    config = TransformerConfig(
        num_layers=layers, hidden_size=like.hidden, num_attention_heads=like.heads,
        num_query_groups=like.kv_heads, kv_channels=like.head_dim, ffn_hidden_size=like.hidden,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, qk_layernorm=True,
        num_moe_experts=like.experts, moe_ffn_hidden_size=like.intermediate, moe_router_topk=8,
        moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True, perform_initialization=False,
        params_dtype=torch.bfloat16, bf16=True)
    spec = lora_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                     LoRAConfig(r=r, alpha=2 * r))
    model = GPTModel(config, spec, vocab_size=like.vocab, max_sequence_length=64,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return model.to(torch.bfloat16)  # the local spec's torch norms and the router are fp32


def measure_moe_bytes(like: Model, layers: int, r: int) -> dict:
    """The bytes of one merged sync and one adapter sync (and its SGLang payload) of `moe_model`
    with `layers` layers, read from its parameters (the adapters under their checkpoint names,
    experts by global index, as slime names them)."""
    from megatron_lora import gather_peft_adapter, merged_weights
    from megatron_lora.interop import sglang
    from megatron_lora.modules import lora_tensors

    model = moe_model(like, layers, r)
    tensors = {f"module.module.{n}": p.detach() for n, p in model.named_parameters()}
    view = merged_weights(tensors, model)
    merged = sum(view[name].numel() * view[name].element_size() for name in view)
    adapters = {name: param.detach() for name, (param, _) in lora_tensors(model).items()}
    adapter = gather_peft_adapter(adapters, model, architecture="Qwen3MoeForCausalLM")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.tensors().values())
    payload = len(sglang.encode_tensors(adapter.tensors()))
    del model, tensors, view, adapters, adapter
    return {"merged": merged, "adapter": adapter_bytes, "payload": payload}


def moe_rows(ranks=(16, 64)) -> list[dict]:
    """Qwen3-30B-A3B's bytes per sync, measured on 1 and 2 of its layers, extrapolated per
    layer to its 48."""
    like = next(m for m in QWEN3 if m.experts)
    rows = []
    for r in ranks:
        one, two = (measure_moe_bytes(like, layers, r) for layers in (1, 2))
        full = {k: one[k] + (like.layers - 1) * (two[k] - one[k]) for k in one}
        rows.append({"model": like.name, "r": r, "merged_formula": like.parameters() * BF16,
                     "merged_measured": full["merged"],
                     "adapter_formula": like.adapter_parameters(r) * BF16,
                     "adapter_measured": full["adapter"], "payload_bytes": full["payload"],
                     "ratio": full["adapter"] / full["merged"]})
    return rows


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-moe", dest="moe", action="store_false",
                        help="skip the Qwen3-30B-A3B measurement (about 4 GB of memory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.r, args.rounds, args.moe = 256, 2, [16], 2, False
    return args


def main(argv=None):
    args = parse_args(argv)
    machine = common.describe_machine()
    setup = (f"bf16; measured on a Megatron GPT (hidden {args.hidden}, {args.layers} layers, "
             f"GQA, SwiGLU, untied head), TP=1, from a CPU copy of its parameters; median of "
             f"{args.rounds} turns")
    print(f"machine: {machine}\n{setup}")
    geometry = geometry_rows()
    common.print_table(GEOMETRY_COLUMNS, geometry)
    measured, timing, measured_moe = [], [], []
    with common.single_rank():
        for r in args.r:
            m, t = measure_small(args.hidden, args.layers, r, args.rounds)
            measured.append(m)
            timing.append(t)
        if args.moe:
            measured_moe = moe_rows()
    common.print_table(MEASURED_COLUMNS, measured)
    common.print_table(TIMING_COLUMNS, timing)
    if measured_moe:
        common.print_table(MEASURED_COLUMNS, measured_moe)
    common.write_json(args.json, {"machine": machine, "setup": setup, "geometry": geometry,
                                  "measured": measured, "timing": timing,
                                  "measured_moe": measured_moe})


if __name__ == "__main__":
    main()
