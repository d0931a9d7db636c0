"""Where accelerate put a model split by `--device-map` / `--max-memory`.

A module that accelerate offloads (to "cpu" while the model runs on an accelerator, or to "disk")
keeps its parameters on the meta device; its `AlignDevicesHook` holds the real values in a
`weights_map` and copies them to the execution device just for each forward pass. A disk-offloaded
tensor there is read afresh from its file (the checkpoint's safetensors, or a `.dat` in the offload
folder) on every access, so a write into what one access returned would be lost. `stored_tensor`
therefore keeps an edited tensor in the weights map's own memory, where every later forward pass
(and `save_pretrained`) reads it, and `release` lets it go once it equals the stored one again.
Modules without such a hook are returned untouched, whatever their device.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


def _hooks(module: nn.Module) -> Iterator[Any]:
    hook = getattr(module, "_hf_hook", None)
    yield from getattr(hook, "hooks", None) or ([hook] if hook is not None else [])


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's, else that of its first tensor (an
    offloaded module's own tensors are on the meta device)."""
    for hook in _hooks(module):
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return next(iter([*module.parameters(), *module.buffers()])).device


def _offloaded(module: nn.Module, name: str) -> tuple[Any, str] | None:
    """(the mapping that really holds `module.name`, its key there), or None when not offloaded."""
    if not getattr(module, name).is_meta:
        return None
    for hook in _hooks(module):
        store = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and store is not None:
            # accelerate's PrefixedDataset names the module's tensors inside the model-wide loader
            return getattr(store, "dataset", store), getattr(store, "prefix", "") + name
    return None


def stored_tensor(module: nn.Module, name: str, *, writable: bool = True) -> torch.Tensor:
    """`module.name` itself, or for an offloaded module the tensor its forward passes will use.

    With `writable`, a tensor accelerate would read from disk is read once and kept in memory by
    its loader (its in-memory `state_dict` takes priority over the disk index), so writes into the
    result last; without, it may be a fresh copy and nothing stays in memory.
    """
    found = _offloaded(module, name)
    if found is None:
        return getattr(module, name)
    store, key = found
    in_memory = getattr(store, "state_dict", None)
    if writable and isinstance(in_memory, dict) and key not in in_memory:
        in_memory[key] = store[key]
    return store[key]


def release(module: nn.Module, name: str) -> None:
    """Drop the in-memory copy `stored_tensor(writable=True)` made of a disk-offloaded tensor, when
    it equals the stored one again (after an undo); an edited one is kept."""
    found = _offloaded(module, name)
    in_memory = getattr(found[0], "state_dict", None) if found else None
    if not isinstance(in_memory, dict) or found[1] not in getattr(found[0], "index", {}):
        return  # not offloaded, or held in memory by accelerate itself (cpu offload)
    store, key = found
    kept = in_memory.pop(key, None)
    if kept is not None and not torch.equal(kept, store[key]):
        in_memory[key] = kept
