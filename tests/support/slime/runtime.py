"""What a rank does before and around slime's own code.

`setup(trees)` runs in each rank process before anything imports megatron: the patched
Megatron-LM and slime go first on `sys.path` (ahead of the installed megatron-core), the TE
emulation is found as `transformer_engine` (slime's Megatron backend builds the TE layer spec),
and the stand-ins are installed. `cpu_runtime()` then redirects megatron-core's CUDA-only spots
and registers the CPU accelerator.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from pathlib import Path

import torch


def setup(slime_tree: str, megatron_tree: str, live_sglang: bool = False) -> None:
    import te_emulation

    from support.slime import standins

    for path in (megatron_tree, slime_tree):
        if path not in sys.path:
            sys.path.insert(0, path)
    te_emulation.enable()
    standins.install(live_sglang=live_sglang)
    # slime's switch for its reloadable WORLD (the --offload-train sleep/wake cycle, not run
    # here). Registered, it wraps every gloo subgroup in `ReloadableProcessGroup`, whose
    # forwarding misses `reduce_scatter_single`, the method torch 2.13's reduce_scatter_tensor
    # calls (older torch called `_reduce_scatter_base`, which it forwards).
    os.environ["SLIME_DESTROY_WORLD_PROCESS_GROUP"] = "0"
    import megatron.core

    if not Path(megatron.core.__file__).resolve().is_relative_to(Path(megatron_tree).resolve()):
        raise RuntimeError(f"megatron.core came from {megatron.core.__file__}, not {megatron_tree}")


def cpu_runtime() -> None:
    """megatron-core on CPU (`megatron_cpu.device`), slime's CPU accelerator, and
    Megatron-LM's training code where it asks CUDA directly."""
    from megatron_cpu import device
    from support.slime import cpu_accelerator

    device.enable()
    cpu_accelerator.register()
    _megatron_training_on_cpu()


def _no_cuda_arch() -> int:
    return 0  # no CUDA device: below every architecture gate


def _stay_on_cpu(module, device=None):
    if device is not None and torch.device(device).type != "cpu":
        raise NotImplementedError(f"{type(module).__name__}.cuda({device!r}) on a CPU run")
    return module


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
              "randint", "zeros_like", "ones_like", "empty_like", "full_like")


def _cpu_if_cuda(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_device(factory):
    def on_cpu(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # page-locked host memory is CUDA's allocator's
        return factory(*args, **kwargs)

    on_cpu.__wrapped__ = factory
    return on_cpu


def _tensor_to(original):
    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)):
            args = (_cpu_if_cuda(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def _type_as_on_the_gpu(original):
    def type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    return type


def _megatron_training_on_cpu() -> None:
    import megatron.training.arguments as training_arguments
    import megatron.training.utils as training_utils

    # `get_model` moves the built model with `module.cuda(torch.cuda.current_device())`, which
    # megatron_cpu.device points at the CPU: there the model already is.
    torch.nn.Module.cuda = _stay_on_cpu
    # ...and wraps the DDP set-up in a side stream; CPU work is ordered, one stream is all.
    torch.cuda.Stream = lambda *args, **kwargs: torch.cuda.current_stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    # megatron-core's optimizer, grad scaler, clip-grad and DDP buffers allocate their small
    # state with `device="cuda"` spelled out (megatron_cpu.device covers the
    # `torch.cuda.current_device()` spelling): the one device here is the CPU.
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, **kwargs: self
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    # ...and its optimizers dispatch on `param.type()` strings, "torch.cuda.BFloat16Tensor" and
    # the like: the CPU tensor answers with the name it would have on the GPU.
    torch.Tensor.type = _type_as_on_the_gpu(torch.Tensor.type)
    # Checkpoints save and restore the device generator next to the CPU one: here they are one
    # (megatron_cpu.device runs Megatron's RNG tracker on CPU generator states likewise).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)

    # `validate_args` reads the GPU's compute capability to pick CUDA_DEVICE_MAX_CONNECTIONS
    # advice; below Blackwell it requires the variable at 1, as slime's launch scripts set it.
    training_utils.get_device_arch_version = _no_cuda_arch
    training_arguments.get_device_arch_version = _no_cuda_arch
    # ...and, with --moe-grouped-gemm, the compute capability (Ampere or later, for the grouped
    # GEMM kernels): the experts here are the TE emulation's GroupedLinear, a loop of CPU GEMMs
    # that needs none. The lowest capability the check accepts; nothing else here reads it
    # (CUDA graphs and the fused linear cross-entropy, its other readers, are off).
    torch.cuda.get_device_capability = lambda device=None: (8, 0)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1, below the kernel's ephemeral range. Each is bound
    minutes after it is picked (one per actor a layout builds), and a port of that range may
    meanwhile be handed to an outgoing connection (a gloo or TCPStore client): a bind then failed
    with EADDRINUSE. Drawn by the system's RNG: the global one is seeded alike on every run."""
    low = _ephemeral_ports()[0]
    draw = random.SystemRandom()
    ports: list[int] = []
    for _ in range(1000):
        port = draw.randrange(10000, low)
        if port not in ports and _bindable(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports in [10000, {low}) on 127.0.0.1")


def _ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def hand_over_process_group(count: int) -> list[int]:
    """Rank 0 picks `count` free ports and tells every rank over the launcher's gloo group,
    which is then destroyed: slime's `TrainRayActor.init` creates its own (env://), once per
    actor built in this process."""
    import torch.distributed as dist

    ports = [free_ports(count) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(ports, src=0)
    dist.destroy_process_group()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    return ports[0]
