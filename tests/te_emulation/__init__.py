"""A CPU emulation of Transformer Engine's PyTorch API, so megatron-core's TE wrappers run in tests.

    run_on_ranks(fn, world_size=2, setup=te_emulation.enable)

`site_packages/` holds an importable fake distribution: the `transformer_engine` package and
a `transformer_engine-2.11.0.dist-info`, so `importlib.metadata.version("transformer-engine")`
and megatron-core's `get_te_version()` answer 2.11.0. `enable()` puts `site_packages/` first on
`sys.path`.
megatron-core decides at import time whether TE exists, so `enable()` must run in a fresh process
before megatron is imported: pass it as the launcher's `setup`, and never call it in the pytest
process itself (the other tests expect no TE).

Why 2.11.0: megatron-core 0.16 requires `transformer-engine>=2.9.0a0,<2.12.0`; 0.19 has no bound,
and every version gate it has above 2.11 is MoE-only (grouped weights, fused router), so with 2.11
both take their mainstream dense-model paths (e.g. TE >= 2.10 `num_splits` in attention).

Written from TE's Python source at tag v2.11 (read, not copied); what is emulated and what is not
is listed in `transformer_engine/__init__.py`.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

SITE_PACKAGES = pathlib.Path(__file__).resolve().parent / "site_packages"
TE_VERSION = "2.11.0"


def enable() -> None:
    """Make `import transformer_engine` find the emulation. Idempotent.

    Raises if megatron-core or another `transformer_engine` was imported first: megatron would
    already have decided that TE is absent (or use the other one).
    """
    loaded = sys.modules.get("transformer_engine")
    if loaded is not None:
        if pathlib.Path(loaded.__file__).resolve().is_relative_to(SITE_PACKAGES):
            return
        raise RuntimeError(f"another transformer_engine is already imported: {loaded.__file__}")
    if "megatron.core" in sys.modules:
        raise RuntimeError("te_emulation.enable() must run before megatron.core is imported")
    path = str(SITE_PACKAGES)
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
