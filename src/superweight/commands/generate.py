"""`sw generate`: greedy continuations, original vs super weights zeroed vs restored vs a control."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

from ..brief_repr import BriefRepr
from ..versions import __version__
from ..coords import DEFAULT_SELECTION, check_selection, requested
from ..distributed import main_proceeds, on_main
from ..measure import generate as generation
from ..measure.configurations import Configuration, comparison_configurations
from ..measure.generate import Generation
from ..model.options import LoadOptions
from .prepare import Coords, Model, ablated_folder, detected, model_source, ready_model
from .reporter import Reporter


@dataclass(repr=False)
class GenerationResult(BriefRepr):
    """Greedy continuations of each prompt under each configuration."""

    model: dict[str, Any]  # spec, location, dtype
    prompts: list[str]
    max_new_tokens: int
    configurations: list[Configuration]  # original, zeroed, restored, control
    generations: list[Generation]  # configuration, prompt, text

    def to_dict(self) -> dict[str, Any]:
        """The `sw generate --json` document."""
        return {"model": self.model, "max_new_tokens": self.max_new_tokens, "decoding": "greedy",
                "configurations": [c.describe() for c in self.configurations],
                "generations": [g.to_dict() for g in self.generations], "tool": f"superweight {__version__}"}


def generate_text(model: Model = None, *, coords: Coords = None, coord: Optional[list[str]] = None, select: str = DEFAULT_SELECTION,
                  prompt: Optional[list[str] | str] = None, max_new_tokens: int = 16, control: Optional[str] = None,
                  top: Optional[int] = None, seed: int = 0, options: Optional[LoadOptions] = None,
                  reporter: Optional[Reporter] = None) -> Optional[GenerationResult]:
    """`sw generate`: greedy continuations, original vs super weights zeroed vs zeroed with the
    activation restored vs a control (the super weights detected when none are given). Under a
    launcher rank 0 alone detects and decodes (the work is a few greedy tokens); the other ranks get None."""
    reporter = reporter or Reporter()
    check_selection(select)
    if isinstance(prompt, str):
        prompt = [prompt]
    prompts = generation.check_prompts(prompt)
    generation.check_max_new_tokens(max_new_tokens)
    weights = requested(coords, coord, select, say=reporter.note)
    source = model_source(model, options)
    with ExitStack() as recorded:  # a folder's recorded values, put back for the decoding only
        # Without coordinates the super weights are detected: on a folder `sw ablate` wrote, in the
        # original model its record puts back (every value, as `sw study` does), so the rows are the
        # original and its measured super weights zeroed, not the ablated folder's leftover candidates.
        folder = ablated_folder(reporter, source, weights or None, True, recorded)
        unchanged = folder.name
        loaded, weights = ready_model(reporter, model, options, source, weights, coords, put_back=folder.put_back)
        if not weights:
            weights = detected(reporter, loaded, select=select, put_back=folder.put_back is not None)
        configurations = comparison_configurations(loaded.model, weights, control=control, seed=seed, top=top,
                                                   unchanged=unchanged)
        with reporter.status(f"generating {max_new_tokens} tokens x {len(prompts)} prompt(s) x "
                             f"{len(configurations)} configurations"):
            generations = on_main(lambda: generation.generate(loaded.model, loaded.tokenizer, configurations,
                                                              prompts, max_new_tokens=max_new_tokens))
    if not main_proceeds():  # every rank got here: rank 0 prints
        return None
    return GenerationResult(model={"spec": source.spec, "location": source.location, "dtype": loaded.dtype},
                            prompts=prompts, max_new_tokens=max_new_tokens, configurations=configurations,
                            generations=generations)
