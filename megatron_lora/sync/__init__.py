"""Weights for a rollout engine, read from a trainer's own `{name: tensor}` mapping: the merged
model (`merged.py`), or the adapter alone (`adapter_tensors.py` full tensors, `peft_tensors.py`
in PEFT form, gathered with `gather.py`) loaded through an engine client (`engine.py` the
protocol, `engines/` one file per engine) by `adapter_sync.AdapterSync`; `slime.py` holds the
flag checks and the glue slime's patch calls; `hf_state.py` the model under HF names, full
tensors (a merged sync, or the base an engine starts from). The PEFT export and the adapter
checkpoint are built on the same producer, so what is saved and what is served cannot
diverge."""
