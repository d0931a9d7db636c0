"""superweight: find, ablate and evaluate the super weights of large language models.

Load a model once (`load` by name, or `wrap` a model and tokenizer you already hold), then give it
to every command function (`detect_model`, `evaluate_model`, `run_study`, ...): it is never loaded
again. The building blocks (`detect`, `verify`, `ablated`, `restored_activation`, `evaluate`) work
on `loaded.model` directly. Names are imported on first use: `import superweight` reads no torch.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import keyword_errors
from .versions import __version__

# public name -> the module that defines it
_HOMES = {
    "LoadOptions": "superweight.model.options",
    "load": "superweight.model.options",
    "wrap": "superweight.model.wrapped",
    "LoadedModel": "superweight.model.load",
    "Reporter": "superweight.commands.reporter",
    "detect_model": "superweight.commands.detect",
    "DetectionResult": "superweight.commands.detect",
    "ablate_model": "superweight.commands.ablate",
    "AblationResult": "superweight.commands.ablate",
    "evaluate_model": "superweight.commands.evaluate",
    "EvaluationResult": "superweight.commands.evaluate",
    "run_study": "superweight.commands.study",
    "StudyResult": "superweight.commands.study",
    "quantize_model": "superweight.commands.quantize",
    "QuantizationResult": "superweight.commands.quantize",
    "generate_text": "superweight.commands.generate",
    "GenerationResult": "superweight.commands.generate",
    "export_names": "superweight.commands.export",
    "ExportResult": "superweight.commands.export",
    "SuperWeight": "superweight.coords",
    "read_coords": "superweight.coords",
    "write_coords": "superweight.coords",
    "detect": "superweight.find.detect",
    "Detection": "superweight.find.detect",
    "verify": "superweight.measure.verify",
    "Verification": "superweight.measure.verify",
    "ablated": "superweight.edit.ablate",
    "AblationRecord": "superweight.edit.ablate",
    "restored_activation": "superweight.edit.restore",
    "evaluate": "superweight.measure.evaluate",
    "SuperweightError": "superweight.errors",
}

# public submodules, reached as attributes (README: `superweight.distributed.session()` after a plain
# `import superweight`, in a script torchrun starts)
_SUBMODULES = ("distributed",)

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"superweight.{name}")  # the import binds it as a plain attribute
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'superweight' has no attribute '{name}'")
    value = getattr(import_module(home), name)
    if inspect.isfunction(value):  # its errors name the keyword arguments a notebook passed
        value = keyword_errors(value, _keywords(value))
    globals()[name] = value  # once imported, a plain attribute
    return value


def _keywords(function: Any) -> dict[str, str]:
    """How a caller of `function` writes each option its errors may name: `max_length=`,
    `force=True` for a flag, and `LoadOptions(dtype=)` for a loading option."""
    parameters = inspect.signature(function).parameters
    keywords = {name: f"{name}=True" if p.default is False else f"{name}=" for name, p in parameters.items()}
    if "options" in parameters:
        from dataclasses import fields

        from .model import options as model_options

        keywords.update({f.name: f"LoadOptions({f.name}=)" for f in fields(model_options.LoadOptions)})
    return keywords


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | set(_SUBMODULES))


if TYPE_CHECKING:  # what editors and type checkers see
    from .commands.ablate import AblationResult, ablate_model
    from .commands.detect import DetectionResult, detect_model
    from .commands.evaluate import EvaluationResult, evaluate_model
    from .commands.export import ExportResult, export_names
    from .commands.generate import GenerationResult, generate_text
    from .commands.quantize import QuantizationResult, quantize_model
    from .commands.reporter import Reporter
    from .commands.study import StudyResult, run_study
    from .coords import SuperWeight, read_coords, write_coords
    from .edit.ablate import AblationRecord, ablated
    from .edit.restore import restored_activation
    from .errors import SuperweightError
    from .find.detect import Detection, detect
    from .measure.evaluate import evaluate
    from .measure.verify import Verification, verify
    from .model.load import LoadedModel
    from .model.options import LoadOptions, load
    from .model.wrapped import wrap
