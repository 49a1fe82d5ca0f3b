"""All or nothing for a verb that rebuilds LoRA modules in place: on any error, every module is
put back as it was.

A verb such as a PEFT import may have to replace a model's adapters (another rank, other
targets) before it can tell whether the new ones fit: whether a target matches a module, or
whether an MLA adapter's shape is the module's, is known only once the adapter is built. Checking
everything beforehand would mean building it twice. Instead the verb runs inside
`restored_on_error(model)`, which records what building can change and, if the verb raises,
restores it before the error propagates:

- each module's class (a LoRA linear is a subclass swapped in and out: `__class__`),
- each module's attributes, and the contents of the dicts and lists among them in place (its
  parameters, submodules, buffers and hooks; in place, so that hook handles keep working),
- each parameter's `requires_grad` (freezing the base), and the values of the adapter
  matrices (an adapter of the same config may be re-initialized or loaded).

Base weights are never written by such a verb, so their values are not copied. No Megatron
import: both backends can use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lora_common.state import is_lora_parameter


def _contents(value):
    """A copy of a mutable container's contents, to restore into the same object; None for
    anything else."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _refill(container, contents) -> None:
    container.clear()
    (container.extend if isinstance(container, list) else container.update)(contents)


@contextlib.contextmanager
def restored_on_error(*roots: torch.nn.Module | list | tuple) -> Iterator[None]:
    """Within: if the body raises, every module under `roots` (modules, or lists of model
    chunks) gets back its class, attributes, parameters, submodules and hooks, every parameter
    its `requires_grad`, every adapter matrix its values; then the error propagates."""
    chunks = [chunk for root in roots
              for chunk in (root if isinstance(root, (list, tuple)) else [root])]
    modules = {id(module): module for chunk in chunks for module in chunk.modules()}
    saved = [(module, module.__class__,
              {key: (value, _contents(value)) for key, value in vars(module).items()})
             for module in modules.values()]
    parameters = {id(param): (param, param.requires_grad,
                              param.detach().clone() if is_lora_parameter(name) else None)
                  for chunk in chunks for name, param in chunk.named_parameters()}
    try:
        yield
    except BaseException:
        for module, cls, attributes in saved:
            module.__class__ = cls
            for key in set(vars(module)) - set(attributes):
                del vars(module)[key]
            for key, (value, contents) in attributes.items():
                if contents is not None:
                    _refill(value, contents)
                vars(module)[key] = value
        with torch.no_grad():
            for param, requires_grad, values in parameters.values():
                param.requires_grad_(requires_grad)
                if values is not None:
                    param.copy_(values)
        raise
