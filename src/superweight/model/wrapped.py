"""A model the user already holds (their own `AutoModelForCausalLM` and tokenizer: a fine-tune in
memory, a model built in a test) as a `LoadedModel`, for every command function: nothing is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .adapters import resolve_adapter
from .load import LoadedModel
from .source import ModelSource


def wrap(model: nn.Module, tokenizer, name: Optional[str] = None) -> LoadedModel:
    """`model` and `tokenizer` as a `LoadedModel`, named `name` in reports (default: the directory
    or hub id it was loaded from, else its class name). The model is put in eval mode, as a load
    does: detection and evaluation read it without dropout.

    A model read from a local directory keeps that directory as its source: outputs are refused
    inside it, and an ablation recorded there by `sw ablate` is reported, as for a load by name."""
    origin = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    spec = name or origin or type(model).__name__
    if origin and Path(origin).expanduser().is_dir():
        source = ModelSource(spec, "local", str(Path(origin).expanduser()))
    else:  # built or changed in memory: no file of it to protect or to read a record from
        source = ModelSource(spec, "memory", origin or "memory")
    model.eval()
    _, note = resolve_adapter(model)  # a model type the table lacks: which row's layout it follows
    return LoadedModel(model=model, tokenizer=tokenizer, source=source,
                       dtype=str(getattr(model, "dtype", "")).removeprefix("torch."), load_seconds=0.0,
                       notes=[note] if note else [])
