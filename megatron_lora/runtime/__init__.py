"""Running megatron-core here, not LoRA: the CPU runtime (`cpu.py`), N gloo ranks with and
without Megatron's parallel state (`launch.py`, `processes.py`), a training loop on Megatron's
DDP (`ddp_training.py`) and a collective-byte counter (`collective_bytes.py`)."""
