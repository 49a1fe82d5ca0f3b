"""slime and its pinned Megatron-LM, extracted from the vendored archives and patched as slime's
image patches them, plus our LoRA patch.

    trees = prepare(workdir)   # SourceTrees(slime=..., megatron_lm=..., unpatched_arguments=...)

The archives are looked up in `$MEGATRON_LORA_VENDOR` (a folder holding both), else in
`../shared/vendor` beside the repository. `missing_reason()` says why they cannot be used (for a
pytest skip) or returns None.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VENDOR_ENV = "MEGATRON_LORA_VENDOR"
SLIME_ARCHIVE = "slime-624b824a.tar.gz"
MEGATRON_ARCHIVE = "megatron-lm-1dcf0daf.tar.gz"
LORA_PATCH = ROOT / "patches" / "slime-624b824a-lora.patch"
# What slime's docker/Dockerfile applies to Megatron-LM, in its order.
SLIME_MEGATRON_PATCHES = ("megatron.patch", "megatron-sglang-aligned.patch")
ARGUMENTS = "slime/utils/arguments.py"


def vendor_dir() -> Path:
    return Path(os.environ.get(VENDOR_ENV) or ROOT.parent / "shared" / "vendor")


def missing_reason() -> str | None:
    folder = vendor_dir()
    absent = [name for name in (SLIME_ARCHIVE, MEGATRON_ARCHIVE) if not (folder / name).is_file()]
    if absent:
        return (f"slime's sources are not here ({', '.join(absent)} not in {folder}); set "
                f"{VENDOR_ENV} to a folder holding {SLIME_ARCHIVE} and {MEGATRON_ARCHIVE}")
    if shutil.which("git") is None:
        return "git is needed to apply the patches (git apply)"
    return None


@dataclasses.dataclass(frozen=True)
class SourceTrees:
    slime: Path                  # slime at 624b824a with patches/slime-624b824a-lora.patch
    megatron_lm: Path            # Megatron-LM 1dcf0daf with slime's Megatron patches
    unpatched_arguments: Path    # slime's own slime/utils/arguments.py, before our patch


def _apply(patch: Path, tree: Path) -> None:
    # --3way, as slime's Dockerfile, needs an index; a plain apply must be clean anyway.
    result = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=tree,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"git apply {patch.name} in {tree} failed:\n{result.stderr}")


def _extract(archive: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def prepare(workdir: Path) -> SourceTrees:
    """Extract both archives under `workdir` and apply the patches (once per folder)."""
    workdir = Path(workdir)
    trees = SourceTrees(workdir / "slime", workdir / "megatron-lm",
                        workdir / "unpatched" / "arguments.py")
    done = workdir / ".prepared"
    if done.exists():
        return trees
    folder = vendor_dir()
    _extract(folder / SLIME_ARCHIVE, trees.slime)
    _extract(folder / MEGATRON_ARCHIVE, trees.megatron_lm)
    for name in SLIME_MEGATRON_PATCHES:
        _apply(trees.slime / "docker" / "patch" / "latest" / name, trees.megatron_lm)
    trees.unpatched_arguments.parent.mkdir(parents=True)
    shutil.copyfile(trees.slime / ARGUMENTS, trees.unpatched_arguments)
    _apply(LORA_PATCH, trees.slime)
    done.touch()
    return trees
