"""Megatron LoRA <-> other formats with no model and no Megatron import: the model geometry
(`geometry.py`), the HF name and layout mapping (`hf_mapping.py`), the adapter checkpoint file
(`adapter_file.py`), the PEFT conversions (`peft_export.py`, `peft_import.py`), and SGLang's
adapter-loading API as the adapter sync feeds it (`sglang.py`)."""
