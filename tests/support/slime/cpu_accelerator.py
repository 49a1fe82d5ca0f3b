"""slime's accelerator contract (`slime.utils.accelerator.base.Accelerator`) on the CPU.

slime selects its device backend through `register_accelerator` and `SLIME_ACCELERATOR`
("Register a lazily constructed backend without changing Slime core"); this is one more backend:
device "cpu", collectives over gloo, no streams, no device memory of its own. megatron-core's
CUDA-only spots are redirected by `megatron_cpu.device.enable()` as for every CPU test here.
"""

from __future__ import annotations

import psutil
import torch

NAME = "cpu"


def register() -> None:
    import os

    from slime.utils import accelerator
    from slime.utils.accelerator.base import Accelerator

    class CPUAccelerator(Accelerator):
        name = NAME
        device_type = "cpu"
        communication_backend_name = "gloo"

        def is_available(self) -> bool:
            return True

        def device(self, index=None) -> torch.device:
            return torch.device("cpu")

        def device_name(self, index=None) -> str:
            return "cpu"

        def set_device(self, index) -> None:
            pass

        def current_device(self):
            return "cpu"

        def device_count(self) -> int:
            return 1

        def synchronize(self, device=None) -> None:
            pass  # CPU work is synchronous

        def current_stream(self, device=None):
            return _SynchronousStream()

        def empty_cache(self) -> None:
            pass

        def mem_get_info(self, device=None) -> tuple[int, int]:
            memory = psutil.virtual_memory()
            return memory.available, memory.total

        def memory_allocated(self, device=None) -> int:
            return 0

        def memory_reserved(self, device=None) -> int:
            return 0

        def distributed_device_id(self, index=None):
            return None  # gloo binds no device

        @property
        def visible_devices_env(self) -> str:
            return "SLIME_CPU_VISIBLE_DEVICES"

    accelerator.register_accelerator(NAME, CPUAccelerator, lambda: True, priority=-1,
                                     communication_backends=())
    os.environ["SLIME_ACCELERATOR"] = NAME
    accelerator.reset_accelerator()


class _SynchronousStream:
    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass
