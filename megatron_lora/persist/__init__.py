"""What a live model writes and reads: adapter-only checkpoints (`adapter_checkpoint.py`, the file
format being `interop/adapter_file.py`), Megatron dist checkpoints (`dist_checkpoint.py`), and
PEFT adapter folders (`peft.py`: export through the adapter sync's producer, import)."""
