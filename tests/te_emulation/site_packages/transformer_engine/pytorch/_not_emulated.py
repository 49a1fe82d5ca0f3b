"""Placeholders for TE names megatron-core references at import time but a dense GPT on the
emulation never uses: they exist (so class definitions and imports succeed) and raise if used."""

from __future__ import annotations


def not_emulated_class(name: str, base: type = object) -> type:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"transformer_engine {name} is not emulated")

    attributes = {"__init__": __init__, "__doc__": "Not emulated."}
    return type(name.rsplit(".", 1)[-1], (base,), attributes)


def not_emulated_function(name: str):
    def function(*args, **kwargs):
        raise NotImplementedError(f"transformer_engine {name} is not emulated")

    function.__name__ = name.rsplit(".", 1)[-1]
    return function
