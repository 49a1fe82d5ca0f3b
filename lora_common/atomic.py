"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one.

A write goes to a temporary file beside the target, `.<name>.<host>.<pid>.<random>.tmp`, which
is renamed over the target once complete. A writer killed before the rename leaves that
temporary behind; the next write of the same target removes the ones whose writer (same host)
is gone. The leading dot and the `.tmp` suffix keep temporaries from looking like checkpoints.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed writers of `path` on this host left; return them.
    A temporary whose writer still runs (a concurrent save) is left alone."""
    path = Path(path)
    prefix = _temporary_prefix(path)
    removed = []
    for candidate in path.parent.glob(f"{prefix}*.tmp"):
        pid = candidate.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder: write, fsync, rename,
    then fsync the folder so the rename itself survives a power loss."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temporary_prefix(path)}{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically (adapters are small enough to serialize in
    memory)."""
    from safetensors.torch import save

    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))
