"""The demos `megatron-lora` runs on a CPU (2 gloo ranks, TP=2 + sequence parallel):

- `supervised.py`: `megatron-lora demo`, a LoRA fine-tune of a small GPT on a task its base
  never saw;
- `rl.py`: `megatron-lora demo-rl`, GRPO with LoRA against a live SGLang server that samples with
  what the trainer synced after every step (`tasks.py` the demos' tasks and the reward, `rl_loss.py`
  the objective, `rl_engine.py` the rollouts and the syncs, `rl_ranks.py` what each rank runs).
"""
