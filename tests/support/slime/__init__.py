"""Harness that runs slime's own training actor, with our patch applied, on CPU ranks.

- `sources`: slime 624b824a and its Megatron-LM 1dcf0daf from `../shared/vendor`, patched as
  slime's image patches them, plus `patches/slime-624b824a-lora.patch`;
- `standins`: SGLang, torch_memory_saver and Ray, which cannot run here (each fails loudly);
- `cpu_accelerator`: slime's accelerator contract on the CPU (gloo);
- `runtime`: what a rank does before slime is imported, and the process group slime creates;
- `actors`: slime's command line, and building / retiring `MegatronTrainRayActor` in-process;
- `rollout`: the per-rank batch slime's RolloutManager would hand `train`;
- `tiny_qwen2`, `tiny_qwen3_moe`, `tiny_deepseek_v3`: the HF models slime starts from (the dense
  layouts', the MoE recipe's, the MLA recipe's), with the Megatron flags that describe them;
  `hf_checkpoints`: writing and reading their HF folders;
- `engines`: the rollout side of each weight-sync transport, capturing the HF tensors;
- `stages`: the stages a test asserts on.
"""
