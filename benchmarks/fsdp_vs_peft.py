"""fsdp_lora vs `peft.get_peft_model`: step time and peak memory of LoRA training.

Both get the same small-but-not-tiny HF Llama and the same base weights (random, fp32, no
download), the same adapter (r=16, alpha=32, the seven projections, dropout 0) and the same
step: forward + backward + AdamW on the LoRA parameters.

- Step time: both models live in one process and take turns, a block of steps each, with
  the order flipped every round, so a noisy neighbour slows both alike. Reported: median
  and minimum wall time, and median CPU time of the process (steadier on a shared machine;
  with --threads 1, the default, it equals the wall time of an idle machine).
- Memory: each variant runs alone in a fresh subprocess. torch's CPU allocator keeps no
  peak counter, so tensors are tracked at the dispatcher (every op output's storage, until
  it is freed): peak live bytes during a step above the level before it, bytes allocated
  per step, and the activations autograd saves for backward. Peak RSS growth over a step
  is reported too, with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_) so RSS
  follows tensor frees rather than glibc's heap-reuse heuristics. With --device cuda, CUDA's
  peak allocation is added.

    python -m benchmarks.fsdp_vs_peft            # a few minutes on 2 CPU cores
    python -m benchmarks.fsdp_vs_peft --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks import common
from benchmarks.common import Column

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COLUMNS = [
    Column("", "measure"), Column("fsdp_lora", "fsdp_lora", "{:.1f}"),
    Column("peft", "peft", "{:.1f}"), Column("ratio", "ratio", "{:.3f}", bold=True),
]
TABLES = {"rows": COLUMNS}


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per turn")
    parser.add_argument("--worker", choices=["fsdp_lora", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 128, 352, 2, 1000
        args.batch, args.seq, args.rounds, args.steps = 2, 64, 2, 2
    return args


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(args.device).train()


def add_lora(kind: str, base, args):
    if kind == "fsdp_lora":
        from fsdp_lora import LoRAConfig, apply_lora_to_fsdp_model, get_lora_parameters

        model = apply_lora_to_fsdp_model(base, LoRAConfig(r=args.r, alpha=2 * args.r,
                                                          target_modules=LORA_TARGETS))
        return model, list(get_lora_parameters(model).values())
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                            target_modules=LORA_TARGETS))
    return model, [p for p in model.parameters() if p.requires_grad]


def batch(args):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)


class Trainer:
    def __init__(self, kind, base, args):
        self.model, params = add_lora(kind, base, args)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.tokens = batch(args)

    def step(self):
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def time_steps(args) -> dict[str, common.Samples]:
    """Each step timed on its own (wall and process CPU time), a block of `steps` per turn."""
    base = build_base(args)
    trainers = {kind: Trainer(kind, copy.deepcopy(base), args) for kind in ("fsdp_lora", "peft")}
    del base
    return common.time_in_turns({kind: t.step for kind, t in trainers.items()},
                                rounds=args.rounds, steps_per_round=args.steps,
                                warmup=1,  # allocator, AdamW state, lazy inits
                                sync=common.synchronizer(args.device), each_step=True,
                                cpu_time=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TensorMemory(TorchDispatchMode):
    """Live bytes of the storages that ops create while active (each counted until freed)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.allocated = 0
        self._storages: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in self._storages:
                self._storages[key] = weakref.ref(
                    storage, lambda _, k=key, n=nbytes: self._freed(k, n))
                self.live += nbytes
                self.allocated += nbytes
                self.peak = max(self.peak, self.live)
        return out


def saved_for_backward_bytes(trainer) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trainer.model(input_ids=trainer.tokens, labels=trainer.tokens).loss
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(storages.values())


def memory_worker(args) -> dict:
    trainer = Trainer(args.worker, build_base(args), args)
    trainer.step()                                   # AdamW state exists from here on
    saved = saved_for_backward_bytes(trainer)
    with TensorMemory() as tracked:
        trainer.step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    for _ in range(2):
        trainer.step()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    result = {"peak_tensor_memory": tracked.peak, "allocated_per_step": tracked.allocated,
              "saved_for_backward": saved, "peak_rss_growth": max(0, peak_rss - before)}
    if args.device.startswith("cuda"):
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return result


def memory_in_fresh_process(argv: list[str], kind: str) -> dict:
    """memory_worker's result for `kind`, run alone so the other model's tensors are not there."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.fsdp_vs_peft", *argv,
                          "--worker", kind], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return
    passthrough = list(argv if argv is not None else sys.argv[1:])
    machine = common.describe_machine(args.device, libraries=("transformers", "peft"))
    setup = (f"Llama hidden {args.hidden}, ffn {args.intermediate}, {args.layers} layers, "
             f"{args.heads} heads / {args.kv_heads} kv, vocab {args.vocab}; batch {args.batch} x "
             f"seq {args.seq}, fp32 on {args.device}; LoRA r={args.r} on "
             f"{', '.join(LORA_TARGETS)}; {args.rounds * args.steps} timed steps each, in "
             f"{args.rounds} alternating turns")
    print(f"machine: {machine}\nmodel: {setup}")
    times = time_steps(args)
    memory = {kind: memory_in_fresh_process(passthrough, kind) for kind in ("fsdp_lora", "peft")}
    values = {"median step, wall (ms)": {k: 1e3 * common.median(v.wall) for k, v in times.items()},
              "min step, wall (ms)": {k: 1e3 * min(v.wall) for k, v in times.items()},
              "median step, CPU time (ms)": {k: 1e3 * common.median(v.cpu)
                                             for k, v in times.items()}}
    for key in memory["fsdp_lora"]:
        values[f"{key.replace('_', ' ')} (MiB)"] = {k: memory[k][key] / 2**20 for k in memory}
    rows = [{"measure": label, **value,
             "ratio": value["fsdp_lora"] / value["peft"] if value["peft"] else float("nan")}
            for label, value in values.items()]
    common.print_table(COLUMNS, rows)
    common.write_json(args.json, {"machine": machine, "setup": setup, "rows": rows})


if __name__ == "__main__":
    main()
