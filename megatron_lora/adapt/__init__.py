"""Turning a spec or a built model into a LoRA model: the spec transform (`spec.py`) and the entry
points Megatron and slime call by name (`gpt_spec.py`), the post-hoc route (`apply.py`), which
modules a target selects (`selection.py`), each adapter's place and init (`placement.py`), the MoE
variants LoRA adapts or refuses (`moe.py`), and the guard that keeps adapters trained under
activation recompute (`recompute.py`). No megatron import here: `import megatron_lora` binds
`gpt_spec`'s entry points without megatron-core."""
