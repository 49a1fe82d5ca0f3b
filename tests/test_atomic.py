"""Atomic writes: a writer killed mid-write leaves the previous file intact."""

import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lora_common.atomic import atomic_save_safetensors, atomic_write_bytes


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "sub" / "a.safetensors"
    atomic_save_safetensors({"x": torch.arange(4.0)}, path, metadata={"k": "v"})
    assert torch.equal(load_file(path)["x"], torch.arange(4.0))
    assert os.listdir(path.parent) == ["a.safetensors"]


def test_killed_writer_leaves_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    # A writer stopped between writing the temp file and renaming it (stuck in fsync).
    code = (
        "import sys, time, os\n"
        "import lora_common.atomic as a\n"
        "def stuck(fd):\n"
        "    print('writing', flush=True); time.sleep(3600)\n"
        "os.fsync = stuck\n"
        f"a.atomic_write_bytes({str(path)!r}, b'new' * 1000000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == b"old"
