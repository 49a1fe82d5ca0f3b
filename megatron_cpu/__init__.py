"""Running megatron-core on CPU ranks, for tests, the demo and benchmarks. Not LoRA: of
megatron_lora only the demo imports it. megatron-core's CUDA-only spots redirected to the CPU
(`device.py`), N gloo ranks in fresh processes (`processes.py`) and with Megatron's parallel state
(`launch.py`), a training loop on Megatron's DDP (`ddp_training.py`) and a collective-byte counter
(`collective_bytes.py`). Nothing happens at import."""
