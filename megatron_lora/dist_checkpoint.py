"""Megatron dist checkpoints of LoRA models, resharding across TP sizes.

The LoRA linears describe every adapter tensor with its true TP split in
`sharded_state_dict` (see `LoRAParallelLinear.sharded_state_dict`), so
`megatron.core.dist_checkpointing` saves every shard and reloads at any TP size. These two
helpers add what a LoRA run needs on top: loading a base-only checkpoint into a LoRA model.
"""

from __future__ import annotations

from pathlib import Path

from lora_common.state import is_lora_parameter
from megatron_lora.model import model_chunks


def _sharded_state_dict(model) -> dict:
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_dist_checkpoint(model, ckpt_dir: str) -> None:
    """Save the whole model (base and adapters), every TP shard, with Megatron's dist
    checkpointing. Call on every rank."""
    from megatron.core import dist_checkpointing

    sharded = _sharded_state_dict(model)  # refused, before any file, if LoRA is merged
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded, str(ckpt_dir))


def _is_adapter_key(key: str) -> bool:
    # Megatron's SwiGLU factory keys the halves of fc1's B `<key>_w` and `<key>_v`.
    return is_lora_parameter(key.removesuffix("_w").removesuffix("_v"))


def load_dist_checkpoint(model, ckpt_dir: str) -> list[str]:
    """Load a dist checkpoint saved at any TP size into the model, on every rank.

    A checkpoint without adapters (a base model's) loads too: the adapters keep their init.
    Any other tensor missing from the checkpoint is an error naming it, raised before the
    model is touched. Returns the adapter keys that were not in the checkpoint."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_matching_values

    sharded = _sharded_state_dict(model)
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    _check_global_shapes(model, metadata, ckpt_dir)
    saved = set(metadata)

    def is_missing(entry) -> bool:  # tensors only: extra-state objects load as they are
        return isinstance(entry, (ShardedTensor, ShardedTensorFactory)) and entry.key not in saved

    missing, present = extract_matching_values(sharded, is_missing)
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


def _check_global_shapes(model, metadata: dict, ckpt_dir) -> None:
    """Refuse a checkpoint of another geometry before anything loads: the loader writes into
    the model's own tensors as it goes, so a shape error midway would leave it half loaded."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    built = _sharded_state_dict(model)
    apply_factories(built)  # SwiGLU fc1 and friends: the tensors their factories would save
    for entry in _leaves(built):
        saved = metadata.get(getattr(entry, "key", None))
        if isinstance(entry, ShardedTensor) and saved is not None \
                and tuple(saved.global_shape) != tuple(entry.global_shape):
            raise ValueError(f"{ckpt_dir}: tensor {entry.key} has global shape "
                             f"{list(saved.global_shape)} in the checkpoint, "
                             f"{list(entry.global_shape)} in the model")


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
