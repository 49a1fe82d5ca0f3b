"""Megatron dist checkpoints of LoRA models, resharding across TP sizes.

The LoRA linears describe every adapter tensor with its true TP split in
`sharded_state_dict` (see `LoRAParallelLinear.sharded_state_dict`), so
`megatron.core.dist_checkpointing` saves every shard and reloads at any TP size. These helpers
add what a LoRA run needs on top: loading a base-only checkpoint into a LoRA model, with our
own loader or, inside `allow_missing_adapters()`, with any caller's (Megatron-LM's
`load_checkpoint`) under any `--dist-ckpt-strictness`.

The adapter-set rule, checked by both loads before any tensor is copied
(`require_same_adapter_set`): a checkpoint that holds no adapter tensor is base-only and loads
with the model's adapters at their init; a checkpoint that holds adapters must hold exactly the
model's (the same adapted modules, so the same targets, canonical or fused, the same expert
layout), or the load is refused naming the difference. Loading part of the adapters and keeping
the model's own for the rest would be a third adapter, trained by nobody.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)
from megatron.core.dist_checkpointing.utils import extract_matching_values

from lora_common.state import is_lora_parameter
from megatron_lora.modules import model_chunks
from megatron_lora.sync.gather import all_gather_objects

logger = logging.getLogger(__name__)


def _sharded_state_dict(model) -> dict:
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_dist_checkpoint(model, ckpt_dir: str) -> None:
    """Save the whole model (base and adapters), every TP shard, with Megatron's dist
    checkpointing. Call on every rank."""
    sharded = _sharded_state_dict(model)  # refused, before any file, if LoRA is merged
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded, str(ckpt_dir))


def _is_adapter_key(key: str) -> bool:
    # Megatron's SwiGLU factory keys the halves of fc1's B `<key>_w` and `<key>_v`.
    return is_lora_parameter(key.removesuffix("_w").removesuffix("_v"))


def load_dist_checkpoint(model, ckpt_dir: str) -> list[str]:
    """Load a dist checkpoint saved at any TP size into the model, on every rank.

    A checkpoint without adapters (a base model's) loads too: the adapters keep their init. A
    checkpoint with adapters must hold exactly the model's (`require_same_adapter_set`). Any
    other tensor missing from the checkpoint, or of another global shape, is an error naming
    it, raised before the model is touched. Returns the adapter keys that were not in the
    checkpoint (all of the model's for a base-only checkpoint, else none)."""
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    sharded = _sharded_state_dict(model)
    require_same_adapter_set(_keys(sharded), metadata, ckpt_dir)
    _check_global_shapes(model, metadata, ckpt_dir)
    missing, present = _split_by_presence(sharded, set(metadata))
    missing_keys = sorted({entry.key for entry in _leaves(missing)})
    not_adapters = [key for key in missing_keys if not _is_adapter_key(key)]
    if not_adapters:
        raise ValueError(f"{ckpt_dir}: checkpoint lacks tensor(s) {not_adapters}")
    loaded = dist_checkpointing.load(present, str(ckpt_dir))
    for index, chunk in enumerate(model_chunks(model)):
        state = loaded if len(model_chunks(model)) == 1 else loaded[f"model{index}"]
        result = chunk.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        absent = [k for k in result.missing_keys if not _is_adapter_key(k)
                  and not k.endswith("_extra_state")]
        if unexpected or absent:
            raise RuntimeError(f"{ckpt_dir}: state dict mismatch after load: unexpected "
                               f"{unexpected}, missing {absent}")
    return missing_keys


# Megatron's optimizer keys its state of a parameter `optimizer.<...>.<the parameter's key>`;
# that state follows the model's adapters, so the adapter set is read off the model's keys.
_OPTIMIZER_PREFIX = "optimizer."
_ADAPTER_MATRIX = re.compile(r"\.lora_[AB]\.weight\d*$")
_PROJECTION = re.compile(r"\.lora_(?:q|k|v|gate|up)$")  # a canonical adapter's module


def _adapter_modules(keys: Iterable[str]) -> set[str]:
    """The adapted modules that dist-checkpoint keys (a request's or a checkpoint's) describe:
    `decoder.layers.mlp.linear_fc1`, `decoder.layers.self_attention.linear_qkv.lora_q` (one
    key per module type: the layer and expert axes are offsets inside the tensor)."""
    return {_ADAPTER_MATRIX.sub("", key.removesuffix("_w").removesuffix("_v"))
            for key in keys if _is_adapter_key(key) and not key.startswith(_OPTIMIZER_PREFIX)}


def _some(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def require_same_adapter_set(requested: Iterable[str], saved: Iterable[str], ckpt_dir) -> bool:
    """The adapter-set rule of every dist-checkpoint load (the module docstring): whether the
    checkpoint holds adapters (False: base-only, the model's adapters keep their init), or a
    `ValueError` naming the adapted modules one side has and the other lacks. `requested`: this
    rank's keys of the load request; `saved`: the checkpoint's keys. Call on every rank: the
    model's adapters span every pipeline stage, so the ranks' requests are gathered and every
    rank decides alike."""
    model = set().union(*all_gather_objects(_adapter_modules(requested)))
    held = _adapter_modules(saved)
    if not held:
        return False
    lacking, extra = sorted(model - held), sorted(held - model)
    if not lacking and not extra:
        return True
    problems = [] if model else ["the model has no LoRA adapters"]
    if lacking:
        problems.append(f"no adapter for {_some(lacking)}, which the model adapts")
    if extra:
        problems.append(f"adapters for {_some(extra)}, which the model does not adapt")
    canonical = {"the checkpoint": any(map(_PROJECTION.search, held)),
                 "the model": any(map(_PROJECTION.search, model))}
    if model and len(set(canonical.values())) == 2:
        problems.append("; ".join(f"{side}'s adapters are "
                                  f"{'canonical (one per projection)' if c else 'fused'}"
                                  for side, c in canonical.items()))
    raise ValueError(f"{ckpt_dir} holds another LoRA adapter set than the model: "
                     + "; ".join(problems) + ". A checkpoint with adapters must hold exactly "
                     "the model's (same targets, canonical or fused, expert layout); a base-only "
                     "checkpoint loads with the adapters at their init")


def _keys(tree) -> list[str]:
    """The keys of a sharded state dict's tensors and tensor factories."""
    return [entry.key for entry in _leaves(tree)
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory))]


def _check_global_shapes(model, metadata: dict, ckpt_dir) -> None:
    """Refuse a checkpoint of another geometry before anything loads: the loader writes into
    the model's own tensors as it goes, so a shape error midway would leave it half loaded."""
    built = _sharded_state_dict(model)
    apply_factories(built)  # SwiGLU fc1 and friends: the tensors their factories would save
    for entry in _leaves(built):
        saved = metadata.get(getattr(entry, "key", None))
        if isinstance(entry, ShardedTensor) and saved is not None \
                and tuple(saved.global_shape) != tuple(entry.global_shape):
            why = (" (an adapter of another rank, expert count or expert layout)"
                   if _is_adapter_key(entry.key) else "")
            raise ValueError(f"{ckpt_dir}: tensor {entry.key} has global shape "
                             f"{list(saved.global_shape)} in the checkpoint, "
                             f"{list(entry.global_shape)} in the model{why}")


def _split_by_presence(sharded_state_dict: dict, saved: set[str], only=lambda key: True):
    """(tensor entries whose key is not in `saved` and that `only` accepts, everything else)."""
    def is_missing(entry) -> bool:  # tensors only: extra-state objects load as they are
        return (isinstance(entry, (ShardedTensor, ShardedTensorFactory))
                and entry.key not in saved and only(entry.key))

    return extract_matching_values(sharded_state_dict, is_missing)


@contextlib.contextmanager
def allow_missing_adapters():
    """Within: `megatron.core.dist_checkpointing.load`, whoever calls it (Megatron-LM's
    `load_checkpoint` does), leaves the LoRA adapter tensors that the checkpoint does not hold
    out of the request, and logs them. They keep their init and `load_state_dict` reports them
    missing; every other tensor is checked as the caller's strictness says.

    What it adds to the LoRA layers' own `sharded_state_dict` (which loads a base-only checkpoint
    under every strictness that tolerates absent keys): the strictnesses that refuse them
    (`raise_unexpected`, `raise_all`, and the default `assume_ok_unexpected` on megatron-core's
    own torch_dist strategy, which raises `KeyError: ... from model not in state dict`; slime's
    patched Megatron-LM skips absent keys there). A checkpoint that holds adapters must hold
    exactly the model's (`require_same_adapter_set`, refused before anything loads); only a
    base-only checkpoint leaves the adapters at their init. A request without adapters on every
    rank (a model without LoRA) is passed on untouched, with no extra read. Call the wrapped
    load on every rank, with the whole model in the request, as Megatron-LM does. Nests;
    restores the original function on exit.
    """
    original = dist_checkpointing.load
    if getattr(original, "_lora_allows_missing_adapters", False):
        yield
        return

    def load(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        requested = _keys(sharded_state_dict)
        # every rank takes part, so that the ranks whose stage holds adapters can gather
        if any(all_gather_objects(any(map(_is_adapter_key, requested)))):
            saved = set(dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)))
            require_same_adapter_set(requested, saved, checkpoint_dir)
            absent, sharded_state_dict = _split_by_presence(sharded_state_dict, saved,
                                                            only=_is_adapter_key)
            keys = sorted({entry.key for entry in _leaves(absent)})
            if keys:
                logger.warning("%s holds no LoRA adapters for %d tensor(s), left at their init: %s",
                               checkpoint_dir, len(keys), keys)
        return original(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    load._lora_allows_missing_adapters = True
    dist_checkpointing.load = load
    try:
        yield
    finally:
        dist_checkpointing.load = original


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
