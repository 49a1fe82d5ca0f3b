"""Building slime's `MegatronTrainRayActor` in a rank process, as slime's driver would, but
in-process (no Ray): parse the command line with slime's `parse_args`, construct the actor
class, call its `init`.

Several actors are built one after another in one process (the base conversion, the LoRA run,
its resume); `retire(actor)` undoes what `init` set up process-wide (Megatron's parallel state
and globals, the process group slime created) so the next `init` starts as in a fresh worker.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

import torch


def model_module(name: str):
    """The tiny model a layout runs (`tiny_qwen2`, `tiny_qwen3_moe`, `tiny_deepseek_v3` of
    `support.slime`, or a module named in full, such as `support.engine_model`)."""
    return importlib.import_module(name if "." in name else f"support.slime.{name}")


def command_line(*, hf: str, tp: int, pp: int, bf16: bool, lora: bool, model: str = "tiny_qwen2",
                 recipe=(), extra=()) -> list[str]:
    """slime's `train.py` flags for a tiny model on 2 CPU ranks, no SGLang; `recipe`: the
    launch recipe's flags the layout runs (parallel sizes, batching, recompute, ...)."""
    model = model_module(model)
    argv = [
        "train.py", "--debug-train-only", *model.MEGATRON_MODEL_ARGS,
        "--hf-checkpoint", hf, "--make-vocab-size-divisible-by", "16",
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "2",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--global-batch-size", "4",
        "--micro-batch-size", "1", "--seq-length", "32", "--max-position-embeddings", "64",
        "--advantage-estimator", "grpo", "--num-rollout", "2", "--lr", "2e-2", "--min-lr", "2e-2",
        "--lr-decay-style", "constant", "--weight-decay", "0.0", "--clip-grad", "0",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--seed", "1234",
        "--distributed-backend", "gloo", "--no-gradient-accumulation-fusion",
        "--attention-backend", "unfused", "--no-rope-fusion", "--no-bias-swiglu-fusion",
        "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
        "--ckpt-format", "torch_dist", "--use-cpu-initialization",
    ]
    if tp > 1:
        argv.append("--sequence-parallel")
    if bf16:
        argv.append("--bf16")
    if lora:
        argv += ["--use-lora", "--lora-r", "4", "--lora-alpha", "8", *model.LORA_ARGS]
    return argv + list(recipe) + list(extra)


def parse(argv: list[str], arguments_module=None):
    """slime's `parse_args` on `argv` (it reads `sys.argv`, as slime's `train.py` does)."""
    if arguments_module is None:
        from slime.utils import arguments as arguments_module
    saved = sys.argv
    sys.argv = list(argv)
    try:
        return arguments_module.parse_args()
    finally:
        sys.argv = saved


def build(args, port: int, *, role: str = "actor", with_ref: bool = False):
    """`MegatronTrainRayActor(world_size, rank, master_addr, master_port).init(args, role, ...)`;
    returns (actor, start_rollout_id)."""
    from slime.backends.megatron_utils.actor import MegatronTrainRayActor

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    actor = MegatronTrainRayActor(world, rank, "127.0.0.1", port)
    start = actor.init(args, role, with_ref=with_ref)
    return actor, start


def retire(actor) -> None:
    """Release what `init` set up process-wide, so that another actor can be built here."""
    import torch.distributed as dist
    from megatron.core import num_microbatches_calculator as microbatches
    from megatron.core import parallel_state
    from megatron.training import global_vars
    from slime.observability.timer import Timer
    from slime.utils import distributed_utils

    dist.barrier()
    Timer().start_time.clear()  # the actor's timers (its init leaves "train_wait" running)
    Timer().reset()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    distributed_utils.GLOO_GROUP = None
    microbatches._GLOBAL_NUM_MICROBATCHES_CALCULATOR = None
    global_vars._GLOBAL_ARGS = None
    global_vars._GLOBAL_TOKENIZER = None
    for name in ("model", "optimizer", "opt_param_scheduler", "weights_backuper", "weight_updater"):
        actor.__dict__.pop(name, None)
    gc.collect()
    torch.manual_seed(0)
