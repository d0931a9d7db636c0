"""What every command does before its own work, in one place: resolve MODEL, check the outputs,
check the coordinates against the config, load (or take the model given in memory), check the
coordinates against the weights; and the small steps several commands share.

One function per command lives beside this module (`detect`, `ablate`, `evaluate`, `study`,
`quantize`, `generate`, `export`): each takes MODEL as a name or as a `LoadedModel` (from
`superweight.load` or `superweight.wrap`, then never loaded again), its options as plain Python
arguments (same names, same defaults as the CLI), the loading options as one `LoadOptions`, and
returns a result object; the CLI only prints it. Progress goes to a `Reporter` (silent by default).

Under a launcher every rank calls the same function inside `distributed.session()`: detection
and verification run once (`on_main`), every rank reports in (`main_proceeds`) before an output is
written, and rank 0 alone writes and gets the result; the other ranks get None.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

from ..coords import DEFAULT_SELECTION, UNVERIFIABLE, HoldsCoordinates, SuperWeight, coordinates, coordinates_file, select_weights
from ..distributed import on_main
from ..edit.save import (RECORD_FILE, describe_recorded_ablation, recorded_ablation, recorded_originals,
                         recorded_values_put_back, recorded_weights)
from ..edit.validate import CheckedCoords, check_coords_before_load, checked_coords, config_before_load, \
    unique_coords
from ..errors import UsageError
from ..files import check_writable, refuse_current_directory, refuse_inside
from ..find.detect import DEFAULT_PROMPT, detect, encode_prompt
from ..measure.configurations import Configuration
from ..measure.verify import labelled, verify
from ..measure.tasks import load_task, resolve_task_names
from ..model.identity import coordinates_mismatch
from ..model.load import LoadedModel
from ..model.source import ModelSource
from ..model.options import LoadOptions
from ..report.plots import check_plot_format
from .reporter import Bar, Reporter

T = TypeVar("T")
Model = Union[str, LoadedModel, None]  # a name (alias, hub id, directory, .gguf; None: the default) or a model in memory
# `coords=`: a coordinates file from `sw detect`, or `detect_model`'s result itself (coords.coordinates)
Coords = Union[str, Path, HoldsCoordinates, None]
RECORDED_VALUES_PUT_BACK = "original (the folder's recorded values put back in memory)"  # its first row's name


def slug(text: str) -> str:
    """A model's name as a file name (the default output names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if text.endswith(".gguf") else text).strip("-")


@dataclass(frozen=True)
class NamedAfterModel:
    """An output named after the model, in the current directory: `sw detect`'s default
    ./<model>.superweights.yaml, `sw study`'s ./<model>-study. The CLI passes it for an --out not
    given; a library function writes only what its caller names."""
    suffix: str

    def path(self, source: ModelSource) -> Path:
        return Path(f"{slug(source.alias or source.spec)}{self.suffix}")


def batch_size_option(value: int | str) -> int | str:
    """--batch-size as the evaluator takes it: a positive int, or "auto"."""
    text = str(value)
    if text == "auto":
        return "auto"
    if not (text.isdigit() and int(text) > 0):
        raise UsageError(f"--batch-size must be a positive integer or auto, got '{text}'")
    return int(text)


def tasks_with_data(task: list[str] | str, data_dir: Optional[str], also: tuple[str, ...] = ()) -> list[str]:
    """The task names; missing data (of these and of `also`) fails now, not after loading the model."""
    names = resolve_task_names(task)
    for name in dict.fromkeys([*names, *also]):
        load_task(name, data_dir, limit=1)
    return names


def model_source(model: Model, options: Optional[LoadOptions]) -> ModelSource:
    """Where MODEL comes from: resolved from its name, or the source of the model given in memory
    (which loading options cannot change: giving both is a mistake)."""
    if isinstance(model, LoadedModel):
        if options is not None and options != LoadOptions():
            raise UsageError("options= says how to load a model, but this one is already in memory; drop options=")
        return model.source
    return (options or LoadOptions()).resolve(model)


def check_outputs(source: ModelSource, files: Sequence[Optional[Path]] = (), directory: Optional[Path] = None,
                  force: bool = False, plot: Optional[Path] = None, coords: Coords = None,
                  inputs: Optional[dict[Optional[Path], str]] = None) -> None:
    """Outputs are never inside the model's own files, never the file `coords` names nor the
    command's other `inputs` (each path with what it is: "the GGUF file"), nor a folder holding one,
    and are writable. One rule for files and folders: an existing output file, or a non-empty output
    directory, is only replaced with --force. A `plot` is a file whose format matplotlib must be able to write."""
    if plot:
        check_plot_format(plot)
        files = (*files, plot)
    if directory:  # checked again when written (atomic_directory); here before the slow work
        refuse_current_directory(directory)
    named = [Path(path).expanduser().resolve() for path in filter(None, files)]
    twice = next((path for path in named if named.count(path) > 1), None)
    if twice is not None:  # the second write would replace the first
        raise UsageError(f"two outputs of this command are {twice}; give each its own file name")
    inputs = {coordinates_file(coords): "the coordinates file", **(inputs or {})}
    protected = {**source.output_protected_dirs,
                 **{Path(path): what for path, what in inputs.items() if path is not None}}
    for path in filter(None, (*files, directory)):
        if path != directory and Path(path).is_dir():  # first: a file output replaces no folder
            raise UsageError(f"{path} is a directory; give a file name for this output")
        if path == directory and path.exists() and not path.is_dir():  # nor a folder output a file, even with --force
            raise UsageError(f"{path} exists and is not a directory; choose another --out")
        refuse_inside(path, protected)
        if path != directory and Path(path).exists() and not force:
            raise UsageError(f"{path} exists; choose another output file or pass --force to replace it")
        if path == directory and path.is_dir() and any(path.iterdir()) and not force:
            raise UsageError(f"{path} exists and is not empty; choose another --out or pass --force to replace it")
        check_writable(path)


def load(reporter: Reporter, model: Optional[str], options: Optional[LoadOptions], source: ModelSource) -> LoadedModel:
    """MODEL loaded by name, its progress and notes reported; named by its resolved `source`, as
    `sw detect` names it ("loading smollm2-135m", not "loading default model")."""
    with reporter.status(f"loading {source.spec}") as update:
        loaded = (options or LoadOptions()).load(model, progress=update, notice=reporter.say)
    reporter.say(f"loaded {loaded.source.spec} ({loaded.dtype}) in {loaded.load_seconds:.1f} s"
                 + (" from the GGUF cache" if loaded.from_cache else ""))
    for note in loaded.notes:
        reporter.note(note)
    return loaded


@dataclass(frozen=True)
class FolderAsGiven:
    """The model as given, for a command's rows: `name` ("original", or for a folder written by
    `sw ablate` what its record says was done), the folder's `record` (its superweight_ablation.json,
    None for any other model), and where the record's original values are put back in memory for
    the command, the `put_back` that `ready_model` calls, the `weights` the record holds and the
    (original, ablated) `values` put back (else None, (), None)."""
    name: str
    record: Optional[dict[str, Any]] = None
    put_back: Optional[Callable[[LoadedModel], None]] = None
    weights: tuple[SuperWeight, ...] = ()
    values: Optional[list[tuple[float, float]]] = None


def ablated_folder(reporter: Reporter, source: ModelSource, weights: Optional[Sequence[SuperWeight]], restores: bool,
                   stack: ExitStack) -> FolderAsGiven:
    """The model as given (its record read once). Its values are put back where a configuration
    restores the super activation of `weights` (None: every weight the record holds) and the record
    holds their original values: written
    back in memory while `stack` is open and the ablated ones after it, so the rows are the
    original, zeroed and restored model, not the ablated folder under three names. Every weight the
    record holds is put back, not only `weights`: the first row is the original model, also where
    `weights` are some of those the folder had zeroed."""
    prior = recorded_ablation(source)
    if not prior:
        return FolderAsGiven("original")
    every = recorded_weights(prior)
    weights = every if weights is None else weights
    held = {w.key for w in every}
    originals = recorded_originals(prior, every) if restores and weights and all(w.key in held for w in weights) \
        else None
    if originals is None:
        return FolderAsGiven(describe_recorded_ablation(prior), prior)
    reporter.note(f"{source.spec} is ablated; its {RECORD_FILE} holds the original values, put back in "
                  "memory: the command acts on the original model")
    return FolderAsGiven(RECORDED_VALUES_PUT_BACK, prior, weights=tuple(every), values=originals,
                         put_back=lambda loaded: stack.enter_context(
                             recorded_values_put_back(loaded.model, every, originals)))


def no_original_values(source: ModelSource, folder: FolderAsGiven, then: str) -> UsageError:
    """The refusal of a folder `sw ablate` wrote whose record holds no original values to put back (a
    control's, an unreadable one), where the command compares with the original model; `then` says
    why and what to do instead."""
    return UsageError(f"{source.spec} is {folder.name}, and its {RECORD_FILE} holds no original values of super "
                      f"weights to put back: {then}")


def recorded_coordinates(reporter: Reporter, source: ModelSource, folder: FolderAsGiven) -> list[SuperWeight]:
    """For a command given no coordinates that compares with the original model (`sw eval --compare`,
    `--restore-activation`): on a folder `sw ablate` wrote, every weight its record holds (the rows
    are that folder's ablation; `--select` narrows none of them), named by the roles the record keeps;
    `folder` is `ablated_folder`'s with every value put back. [] for any other model. A record with
    no original values to put back is refused: the first row would be the ablated folder."""
    if folder.record is None:
        return []
    if folder.put_back is None:
        raise no_original_values(source, folder, "give --coords FILE or --coord L,R,C, or evaluate the original model")
    reporter.note(f"no coordinates given: acting on the weights {source.spec}'s {RECORD_FILE} records ("
                  f"{describe_recorded_ablation(folder.record)}): " + ", ".join(w.label() for w in folder.weights))
    return list(folder.weights)


def ready_model(reporter: Reporter, model: Model, options: Optional[LoadOptions], source: ModelSource,
                weights: Sequence[SuperWeight] = (), coords: Coords = None,
                put_back: Optional[Callable[[LoadedModel], None]] = None,
                config_check: Optional[Callable[[Any], None]] = None) -> tuple[LoadedModel, CheckedCoords]:
    """The model to work on, and `weights` checked once each way: against the config before a
    load (a wrong coordinates file fails in seconds, not after minutes of loading), then against
    the weights themselves (ranges, and the values the coordinates file recorded). The checked
    coordinates are what the command passes on: ablation, controls and restoration take them
    without checking again. A model given in memory is used as it is: nothing is loaded.
    `put_back` changes the loaded model before its values are checked (a folder `sw ablate` wrote,
    its recorded original values written back in memory). `config_check` is the command's own check
    of the config before a load (of a hub model or a local directory; one read serves both checks)."""
    # Every entry of the file is checked, not only those `--select` picks: a file with one entry out
    # of range or made for another model is a wrong file, whichever entries a command acts on.
    given = coordinates(coords) if coords else None  # the file read once
    entries, made_for = (given.weights, given.meta) if given else ([], {})
    every = unique_coords([*weights, *entries])
    ranges_checked = False
    # A file made for another hub id is told before the load (minutes for a large model, time to
    # stop it); one made for another model_type only once the config is loaded. Told once.
    told = given and not isinstance(model, LoadedModel) and coordinates_mismatch(made_for, source, None, given.name)
    if told:
        reporter.warn(told)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        trust_remote_code = (options or LoadOptions()).trust_remote_code
        config = config_before_load(source, trust_remote_code) if config_check else None
        if config is not None:
            config_check(config)
        ranges_checked = check_coords_before_load(source, every, trust_remote_code=trust_remote_code, config=config)
        loaded = load(reporter, model, options, source)
    if given and not told:
        mismatch = coordinates_mismatch(made_for, source, getattr(loaded.model.config, "model_type", None), given.name)
        if mismatch:
            reporter.warn(mismatch)
    if put_back:
        put_back(loaded)
    if not weights:  # nothing to check: the command detects, or evaluates the model as it is
        return loaded, CheckedCoords(loaded.model, ())
    checked_coords(loaded.model, every, ranges_checked=ranges_checked)
    return loaded, CheckedCoords(loaded.model, weights)


def step(bar: Bar, stage: str, work: Callable[[], T]) -> T:
    """A stage of one step (no finer progress to report): its bar, then `work()`."""
    bar(stage, 0, 1)
    result = work()
    bar(stage, 1, 1)
    return result


def configuration_progress(bar: Bar) -> tuple[Callable[[Configuration], None], Callable[[str, int, int], None]]:
    """`on_start`/`progress` for `run_configurations`: a bar per (configuration, task)."""
    current = {"configuration": ""}

    def on_start(configuration: Configuration) -> None:
        current["configuration"] = configuration.name

    def on_progress(task_name: str, done: int, total: int) -> None:
        bar(f"{current['configuration']}: {task_name}", done, total)

    return on_start, on_progress


def detected(reporter: Reporter, loaded: LoadedModel, bar: Optional[Bar] = None,
             select: str = DEFAULT_SELECTION, announce: bool = True, put_back: bool = False) -> list[SuperWeight]:
    """The candidates of the loaded model on the paper's prompt, found once (rank 0) for every
    rank, narrowed to what `select` names: unless it is "all", each candidate's role is measured
    first (`sw detect --verify`'s verification); `bar` shows it as a stage. `announce` says which
    weights the command acts on (off for a caller that narrows them itself and says so). `put_back`:
    the model is a folder `sw ablate` wrote with its recorded values put back in memory (the
    original model, verified as such, not refused as already ablated)."""
    def measured() -> list[SuperWeight]:
        candidates = detect(loaded.model, encode_prompt(loaded.tokenizer, DEFAULT_PROMPT)).super_weights
        if select == "all" or not candidates:
            return candidates
        prior = None if put_back else recorded_ablation(loaded.source)
        verification = verify(loaded.model, loaded.tokenizer, candidates, prompts=(),
                              recorded_ablation=describe_recorded_ablation(prior) if prior else None)
        if verification.broken:  # no roles: the candidates of a model whose super weights are gone
            reporter.note(f"{loaded.source.spec}: {verification.broken}")
        return labelled(candidates, verification)

    def find() -> list[SuperWeight]:
        return on_main(measured)

    stage = "detecting super weights" if select == "all" else "detecting and verifying super weights"
    if bar:
        weights = step(bar, stage, find)
    else:  # a command without stages (sw generate): still say what the minutes of verification are
        with reporter.status(stage):
            weights = find()
    if not weights:
        reporter.say("detected no candidates")
        return weights
    selection = select_weights(weights, select, "the detection", UNVERIFIABLE)
    if announce:
        reporter.note("acting on " + selection.reason + ": " + ", ".join(w.label() for w in selection.weights))
    return selection.weights
