"""Each rollout engine's own virtualenv in the repository (`.venv-sglang`, `.venv-vllm`), built by
`scripts/engine-venv.sh` from the lock in `constraints/`: the engines pin other torch, transformers
and numpy versions than the trainer's `.venv`, so a server runs from its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("sglang", "vllm")


def venv_dir(engine: str) -> Path:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    return ROOT / f".venv-{engine}"


def python(engine: str) -> Path:
    return venv_dir(engine) / "bin" / "python"


def built(engine: str) -> bool:
    """Whether the engine's virtualenv was built (its stamp is there; it may be out of date)."""
    return (venv_dir(engine) / ".installed").is_file()


def build(engine: str) -> Path:
    """Build the engine's virtualenv, or check that it is current (a few GB the first time);
    returns its python."""
    venv_dir(engine)  # names a bad engine
    subprocess.run([str(ROOT / "scripts" / "engine-venv.sh"), engine], check=True)
    return python(engine)
