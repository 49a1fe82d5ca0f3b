"""One file per kind of rollout engine, each defining `Client` (the `EngineClient` protocol of
`sync/engine.py`): `client("sglang")` is `engines/sglang.py`'s."""

from __future__ import annotations

import importlib


def client(kind: str, **options):
    """The engine client of `kind` (a module of this package), made with `options`."""
    try:
        module = importlib.import_module(f"{__name__}.{kind}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{kind}":
            raise
        raise ValueError(f"no rollout engine client {kind!r}: add "
                         f"megatron_lora/sync/engines/{kind}.py defining Client") from None
    return module.Client(**options)
