"""Put on a CPU SGLang server's PYTHONPATH (never the trainer's): two upstream problems of SGLang
0.5.15.post1 on a machine without CUDA, worked around where the server starts.

- With `--enable-lora` SGLang asks for page-locked host memory unconditionally
  (`srt/lora/layers.py`, `lora/backend/torch_backend.py`: `pin_memory=True`, `.pin_memory()`),
  which needs CUDA's allocator and fails here (sglang#31894). Without CUDA, pinning is a no-op:
  the tensor stays in ordinary memory, which is all a CPU engine reads.
- PyPI's torchvision is built against CUDA torch: beside the CPU torch its C extension does not
  load, and `torchvision/_meta_registrations.py` then registers fake kernels for
  `torchvision::nms` / `qnms`, which do not exist, so `import torchvision` (which SGLang does at
  start-up) fails. A fake kernel for an operator that does not exist is skipped.
"""

import torch

if not torch.cuda.is_available():
    _FACTORIES = ("tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange",
                  "empty_like", "zeros_like", "ones_like", "full_like")

    def _unpinned(factory):
        def call(*args, **kwargs):
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        call.__wrapped__ = factory
        return call

    for _name in _FACTORIES:
        setattr(torch, _name, _unpinned(getattr(torch, _name)))
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self

_register_fake = torch.library.register_fake


def _operator_exists(qualname: str) -> bool:
    namespace, _, name = qualname.partition("::")
    try:
        getattr(getattr(torch.ops, namespace), name.split(".")[0])
    except (AttributeError, RuntimeError):
        return False
    return True


def register_fake(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith("torchvision::") and not _operator_exists(op):
        return (lambda fn: fn) if not args and kwargs.get("func") is None else args[0]
    return _register_fake(op, *args, **kwargs)


torch.library.register_fake = register_fake
