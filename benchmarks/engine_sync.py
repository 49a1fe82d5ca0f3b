"""Weight sync to a live rollout engine: from "optimizer step done" to "the engine serves the new
weights", adapter vs merged.

On one Qwen2-shaped model (hidden 1024, 8 layers, r=16 on every linear, fp32 as the CPU servers
run it), trained at TP=1 in this process, each round is an Adam step (untimed), then the sync and
one prompt-log-prob request to the engine, timed together; the request's answer is checked
against the trainer's log-softmax (so the time is that of the new weights being served). The
syncs are `tests/support/engine_sync.py`'s, as `make test-engines` runs them: `adapter` (the
library's `AdapterSync`: `gather_peft_adapter`, then SGLang's `/load_lora_adapter_from_tensors`
or a PEFT folder and vLLM's `/v1/load_lora_adapter`; the server paused and resumed around it),
`merged_tensor` (SGLang's `/update_weights_from_tensor`) and `merged_disk` (an HF folder, SGLang's
`/update_weights_from_disk` or vLLM's `reload_weights`). A merged sync replaces the engine's
base, so the modes run in blocks (adapter first), not in turns. Also timed: a lone request.

    python -m benchmarks.engine_sync [--quick]      # needs .venv-sglang and .venv-vllm
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import Column

ROOT = Path(__file__).resolve().parents[1]
ENGINE_VERSIONS = {"sglang": "SGLang 0.5.15.post1", "vllm": "vLLM 0.32.0 (CPU build)"}

COLUMNS = [
    Column("engine", "engine"), Column("sync", "mode"),
    Column("bytes per sync", "bytes", "{:,}"),
    Column("step done -> served, s (median)", "seconds", "{:.3f}"),
    Column("min", "min", "{:.3f}"), Column("max", "max", "{:.3f}"),
    Column("/ merged (same engine, fastest merged)", "ratio", "{:.3f}", bold=True),
    Column("served vs trainer, max abs diff", "diff", "{:.1e}"),
]
TABLES = {"engine_sync": COLUMNS}


def _hf_config(hidden: int, layers: int, vocab: int):
    from support import hf_llama

    heads = hidden // 64
    return hf_llama.hf_config(
        "qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 4,
        max_position_embeddings=128, rms_norm_eps=1e-6, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _write_model(path: Path, hidden: int, layers: int, vocab: int) -> Path:
    from support import hf_llama
    from support.slime.tiny_qwen2 import tokenizer

    model = hf_llama.build_hf_model(_hf_config(hidden, layers, vocab), seed=0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer(vocab).save_pretrained(path)
    return path


def _loss(vocab: int):
    def loss(model, step):
        generator = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(3, vocab, (2, 32), generator=generator)
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        return model(ids, positions, None, labels=torch.roll(ids, -1, 1)).float().mean()

    return loss


def measure_engine(engine: str, model_dir: Path, work: Path, r: int, rounds: int,
                   vocab: int) -> list[dict]:
    from engine_servers import sglang, vllm
    from lora_common import LoRAConfig
    from megatron_lora import lora_spec, mark_only_lora_as_trainable
    from support import engine_model, engine_sync, hf_llama

    module = {"sglang": sglang, "vllm": vllm}[engine]
    server = module.server(model_dir, log_path=work / f"{engine}.log", max_lora_rank=r)
    rows = []
    try:
        server.wait_ready(module.READY_PATH, module.STARTUP_TIMEOUT)
        with common.single_rank():
            hf = engine_model.load(model_dir)
            model = hf_llama.gpt_from_hf(hf, lora_spec(hf_llama.local_spec(hf.config),
                                                        LoRAConfig(r=r, alpha=2 * r)))
            del hf
            mark_only_lora_as_trainable(model)
            prompt = torch.randint(3, vocab, (1, 24), generator=torch.Generator().manual_seed(1))

            def trainer_logprobs():
                with torch.no_grad():
                    logits = hf_llama.gpt_logits(model, prompt).float()
                return torch.log_softmax(logits[0, :-1], -1).gather(
                    -1, prompt[0, 1:, None]).squeeze(-1)

            lone = []
            for mode in engine_sync.MODES[engine]:
                sync = engine_sync.make(engine, mode, server.url, model, str(work), str(model_dir))
                timing = _Timing(sync, model, prompt, str(model_dir), vocab, trainer_logprobs)
                timing.round(timed=False)  # warm-up
                for _ in range(rounds):
                    timing.round(timed=True)
                sync.close()
                sync.restore_base()
                lone += timing.lone
                seconds = timing.seconds
                rows.append({"engine": ENGINE_VERSIONS[engine], "mode": mode,
                             "bytes": sync.sent_bytes, "seconds": statistics.median(seconds),
                             "min": min(seconds), "max": max(seconds), "diff": max(timing.diffs)})
            rows.append({"engine": ENGINE_VERSIONS[engine], "mode": "(a lone request)",
                         "bytes": None, "seconds": statistics.median(lone), "min": min(lone),
                         "max": max(lone), "diff": None})
    finally:
        server.stop()
    merged = min(row["seconds"] for row in rows if row["mode"].startswith("merged"))
    for row in rows:
        row["ratio"] = row["seconds"] / merged if row["bytes"] else None
    return rows


class _Timing:
    """Rounds of one sync mode: an Adam step, then (timed) the sync and a request whose answer
    is checked against the trainer; then a lone request, timed too."""

    def __init__(self, sync, model, prompt, model_dir, vocab, trainer_logprobs):
        self.sync, self.model, self.model_dir = sync, model, model_dir
        self.prompt = prompt[0].tolist()
        self.vocab, self.trainer_logprobs = vocab, trainer_logprobs
        self.seconds, self.diffs, self.lone = [], [], []
        self.version = 0

    def request(self):
        from support import engine_sync

        return engine_sync.served(self.sync, self.prompt, self.sync.adapter, self.model_dir)

    def round(self, timed: bool) -> None:
        from megatron_cpu.ddp_training import train_with_megatron_ddp

        self.version += 1
        train_with_megatron_ddp(self.model, self.model.config, _loss(self.vocab), steps=1,
                                lr=1e-3)
        start = time.perf_counter()  # the optimizer step is done
        self.sync.push(self.version)
        served = self.request()
        elapsed = time.perf_counter() - start
        self.diffs.append((torch.tensor(served) - self.trainer_logprobs()).abs().max().item())
        if timed:
            self.seconds.append(elapsed)
        start = time.perf_counter()
        self.request()
        self.lone.append(time.perf_counter() - start)


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--engines", nargs="+", default=["sglang", "vllm"])
    return parser.parse_args(argv)


def main(argv=None):
    from engine_servers import venvs

    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # the engine tests' syncs and model converter
    hidden, layers, vocab, r, rounds = (256, 2, 512, 8, 2) if args.quick else (1024, 8, 8192, 16, 5)
    missing = [e for e in args.engines if not venvs.built(e)]
    if missing:
        raise SystemExit(f"engine_sync: {', '.join(missing)} not built (make venv-engines)")
    setup = (f"hidden {hidden}, {layers} layers, vocab {vocab}, r={r} on every linear, fp32, "
             f"TP=1; {rounds} timed rounds per sync mode after a warm-up; "
             f"{', '.join(ENGINE_VERSIONS[e] for e in args.engines)} on 127.0.0.1")
    print(setup)
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine_sync.") as tmp:
        model_dir = _write_model(Path(tmp) / "model", hidden, layers, vocab)
        for engine in args.engines:
            engine_rows = measure_engine(engine, model_dir, Path(tmp), r, rounds, vocab)
            common.print_table(COLUMNS, engine_rows)
            rows += engine_rows
    common.write_json(args.json, {"machine": common.describe_machine(), "setup": setup,
                                  "engine_sync": rows, "hidden": hidden, "layers": layers,
                                  "r": r})


if __name__ == "__main__":
    main()
