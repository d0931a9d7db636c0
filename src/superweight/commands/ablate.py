"""`sw ablate`: zero or rescale the super weights (or a control) and save the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..brief_repr import BriefRepr
from ..coords import DEFAULT_SELECTION, check_selection, requested
from ..distributed import main_alone
from ..edit.ablate import AblationRecord, ablated
from ..edit.save import describe_recorded_ablation, recorded_ablation, save_ablated
from ..errors import UsageError
from ..measure.configurations import check_control, control_weights, outlier_count, parse_factor
from ..model.options import LoadOptions
from .prepare import Coords, Model, check_outputs, model_source, ready_model
from .reporter import Reporter


@dataclass(repr=False)
class AblationResult(BriefRepr):
    """What `ablate_model` changed and where it wrote the model."""

    out: Path
    record: AblationRecord  # coordinates, original values, mode, control
    changed: int  # how many weights
    control: Optional[str]
    mode: str  # zero | scale
    factor: float

    @property
    def description(self) -> str:
        """What was done, as `sw eval` names its rows: "super weight [11, 507, 1229] zeroed",
        "3 super weights scaled x2", "1 random weight zeroed" (the record keeps it for `sw eval`)."""
        return self.record.name

    def to_dict(self) -> dict:
        """The `sw ablate --json` document."""
        return {"out": str(self.out), "ablation": self.record.to_dict()}


@main_alone  # under a launcher rank 0 alone runs it, as one process
def ablate_model(model: Model = None, *, out: Path, coords: Coords = None,
                 coord: Optional[list[str]] = None, select: str = DEFAULT_SELECTION, mode: Optional[str] = None, factor: Optional[str] = None,
                 control: Optional[str] = None, top: Optional[int] = None, seed: int = 0, force: bool = False,
                 options: Optional[LoadOptions] = None,
                 reporter: Optional[Reporter] = None) -> Optional[AblationResult]:
    """`sw ablate`: zero or rescale the super weights (or a control) and save the model to `out`.
    A model given in memory is left as it was: ablated for the save only."""
    reporter = reporter or Reporter()
    check_selection(select)
    out = Path(out)
    factor = None if factor is None else str(factor)
    how, value = parse_factor(factor, mode)
    if mode is None and factor is not None:
        reporter.say(f"--factor {factor} given: scaling the weights (--mode scale)")
    check_control(control, top)
    weights = requested(coords, coord, select, say=reporter.note)
    if not weights:
        raise UsageError("no coordinates given; pass --coords FILE (from `sw detect`) or --coord LAYER,ROW,COL")
    source = model_source(model, options)
    prior = recorded_ablation(source)
    if prior:  # a second record would hold only its own weights: "the original" put back from it would not be
        raise UsageError(f"{source.spec} is {describe_recorded_ablation(prior)}; an ablation of it would record only "
                         "its own weights, so the commands that put the original back from its record would not; "
                         "ablate the original model with every weight at once (--coord repeated, or --coords)")
    check_outputs(source, directory=out, force=force, coords=coords)
    loaded, weights = ready_model(reporter, model, options, source, weights, coords)
    top = outlier_count(loaded.model, control, top)
    targets = control_weights(loaded.model, weights, control, seed=seed, top=top) if control else weights
    with ablated(loaded.model, targets, mode=how, factor=value, control=control,
                 seed=seed if control == "random" else None, top=top if control == "outliers" else None,
                 reference=weights if control else None) as record:
        with reporter.status(f"writing {out}"):
            save_ablated(loaded, record, out, force=force)
    return AblationResult(out=out, record=record, changed=len(targets), control=control, mode=how, factor=value)
