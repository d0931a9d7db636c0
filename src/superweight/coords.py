"""Super-weight coordinates: the record, and coordinate files in and out (YAML or JSON).

A coordinates file looks like:

    model: smollm2-135m
    model_type: llama
    tensor: model.layers.{layer}.mlp.down_proj.weight   # where (row, col) live in the checkpoint
    super_weights:
      - {layer: 11, row: 507, col: 1229, value: 5.876, ...}

Only `layer`, `row` and `col` (and `expert` for mixture-of-experts layers: a routed expert's number,
or `shared` for the layer's shared expert) are required when reading; everything else is provenance.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from .errors import CoordinateOptionError, CoordinatesError, first_line
from .files import atomic_write_text

SHARED_EXPERT = "shared"  # the expert value that names a mixture-of-experts layer's shared expert


@dataclass(frozen=True)
class SuperWeight:
    """One super weight: `down_proj.weight[row, col]` of decoder layer `layer` (of `expert`: a routed
    expert's number, or "shared" for the layer's shared expert)."""

    layer: int
    row: int
    col: int
    expert: int | str | None = None
    value: float | None = None  # the weight itself
    input_activation: float | None = None  # down_proj input at (token, col)
    output_spike: float | None = None  # what the layer writes at (token, row)
    token: int | None = None
    iteration: int | None = None
    # The evidence detection decided on (detect.SpikeRule), so a reader can check the call:
    raw_output: float | None = None  # raw down_proj output at (token, row), before any post norm
    concentration: float | None = None  # raw_output**2 over the token's whole raw output energy
    share: float | None = None  # this weight's part of raw_output: value * input_activation / raw_output
    residual_after: float | None = None  # the residual stream value it lands on, leaving the layer
    # What `sw detect --verify` measured (measure/verify.py): its role (super, joint or inert), the
    # perplexity with it alone zeroed, and its Shapley share of the whole set's effect.
    role: str | None = None
    perplexity_alone_zeroed: float | None = None
    shapley_share: float | None = None

    @property
    def key(self) -> tuple[int, int, int, int | None]:
        return (self.layer, self.row, self.col, self.expert)

    def label(self) -> str:
        where = f"[{self.layer}, {self.row}, {self.col}]"
        if self.expert == SHARED_EXPERT:
            return f"{where} shared expert"
        return where if self.expert is None else f"{where} expert {self.expert}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_REQUIRED = ("layer", "row", "col")
_INT_FIELDS = {"layer", "row", "col", "expert", "token", "iteration"}
_TEXT_FIELDS = {"role"}
# Roles written by releases before the attribution rule; read as the closest role of today.
_LEGACY_ROLES = {"redundant": "joint", "minor": "inert"}

# What `--select` acts on (README: Vocabulary). Candidates are what detection finds; super weights
# are the candidates whose measured removal breaks the model, alone (`super`) or as a set (`joint`).
SELECTIONS = ("super", "set", "all")
DEFAULT_SELECTION = "super"  # the paper's experiments zero the super weight, not every candidate
_SELECTED_ROLES = {"super": ("super",), "set": ("super", "joint"), "all": None}


def from_dict(entry: Any, where: str) -> SuperWeight:
    if not isinstance(entry, dict):
        raise CoordinatesError(f"{where}: expected a mapping with layer, row, col; got {entry!r}")
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise CoordinatesError(f"{where}: missing key(s) {', '.join(missing)}; each entry needs layer, row, col")
    known = {f.name for f in fields(SuperWeight)}
    values = {}
    for key, value in entry.items():
        if key == "effect" and "role" not in entry:  # the name releases before the attribution rule used
            key, value = "role", _LEGACY_ROLES.get(value, value) if isinstance(value, str) else value
        if key not in known:
            continue
        if value is None:
            values[key] = None
        elif key in _TEXT_FIELDS:
            if not isinstance(value, str):
                raise CoordinatesError(f"{where}: '{key}' must be text, got {value!r}")
            values[key] = value
        elif key == "expert" and value == SHARED_EXPERT:
            values[key] = value
        elif key in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                also = f" or '{SHARED_EXPERT}'" if key == "expert" else ""
                raise CoordinatesError(f"{where}: '{key}' must be a non-negative integer{also}, got {value!r}")
            values[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CoordinatesError(f"{where}: '{key}' must be a finite number, got {value!r}")
            values[key] = float(value)
    return SuperWeight(**values)


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise CoordinateOptionError(f"--select {selection!r}: choose one of {', '.join(SELECTIONS)}")
    return selection


def parse_coord(text: str) -> SuperWeight:
    """`LAYER,ROW,COL`, `LAYER,ROW,COL,EXPERT` or `LAYER,ROW,COL,shared` as given on the command line."""
    parts = [p.strip() for p in text.split(",")]
    shared = len(parts) == 4 and parts[3] == SHARED_EXPERT
    if len(parts) not in (3, 4) or not all(p.isdigit() for p in parts[:3 if shared else 4]):
        raise CoordinateOptionError(
            f"bad coordinate '{text}': write LAYER,ROW,COL (or LAYER,ROW,COL,EXPERT, EXPERT a number or "
            f"'{SHARED_EXPERT}') as non-negative integers"
        )
    numbers = [int(p) for p in parts[:3]]
    expert = SHARED_EXPERT if shared else (int(parts[3]) if len(parts) == 4 else None)
    return SuperWeight(*numbers, expert=expert)


def read_coords(path: str | Path) -> tuple[list[SuperWeight], dict[str, Any]]:
    """Read a coordinates file; returns (super weights, the file's other top-level fields)."""
    path = Path(path)
    if path.is_dir():
        raise CoordinateOptionError(f"{path} is a folder, not a coordinates file; give the .yaml or .json file "
                                    "`sw detect` wrote")
    if not path.is_file():  # a bad --coords value, as click treats a missing path: exit 2
        raise CoordinateOptionError(f"coordinates file not found: {path}; make one with `sw detect MODEL --out {path}`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CoordinatesError(f"{path} is not a text file (not UTF-8); give a coordinates file from `sw detect`") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise CoordinatesError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                               f"{first_line(e) or type(e).__name__}") from None
    if isinstance(data, list):
        data = {"super_weights": data}
    if not isinstance(data, dict) or not isinstance(data.get("super_weights"), list):
        raise CoordinatesError(f"{path}: expected a top-level 'super_weights:' list of {{layer, row, col}} entries")
    weights = [from_dict(e, f"{path}: super_weights[{i}]") for i, e in enumerate(data["super_weights"])]
    first: dict[tuple, int] = {}
    for i, weight in enumerate(weights):  # which entry's value, role and evidence would count is anyone's guess
        if weight.key in first:
            raise CoordinatesError(f"{path}: super_weights[{i}] repeats {weight.label()} (super_weights[{first[weight.key]}]); "
                                   "keep one entry per weight")
        first[weight.key] = i
    meta = {k: v for k, v in data.items() if k != "super_weights"}
    return weights, meta


@dataclass(frozen=True)
class Coordinates:
    """What `coords=` stands for, read once: the entries of a coordinates file and its other fields
    (`model`, `model_type`, `tensor`, ...), or those of a `detect_model` result (the file it wrote,
    or would have written with `out=`). `name` says where they came from in messages; `path` is
    the file, which no output may replace (None for a result held only in memory)."""

    weights: list[SuperWeight]
    meta: dict[str, Any]
    name: str
    path: Path | None = None


class HoldsCoordinates(Protocol):
    """Anything whose `coordinates` is a `Coordinates`: `detect_model`'s result, given as `coords=`."""

    @property
    def coordinates(self) -> Coordinates: ...


def coordinates(given: Any) -> Coordinates:
    """`coords=` as given, THE one place it is read: a coordinates file's path, or a `detect_model`
    result (anything whose `coordinates` is a `Coordinates`), taken as the file it wrote or would
    have written: its roles (with verify=True) and the model it was made for included."""
    if isinstance(given, Coordinates):
        return given
    held = getattr(given, "coordinates", None)
    if isinstance(held, Coordinates):
        return held
    if not isinstance(given, (str, os.PathLike)):
        raise CoordinateOptionError(f"--coords takes a coordinates file (in Python, also detect_model's result), "
                                    f"not a {type(given).__name__}")
    weights, meta = read_coords(given)
    return Coordinates(weights, meta, str(given), Path(given))


def coordinates_file(given: Any) -> Path | None:
    """The file `coords=` names, not read (None when none is given, or for a result held only in
    memory): an input no output of the command may replace."""
    if given is None or isinstance(given, (str, os.PathLike)):
        return Path(given) if given else None
    return coordinates(given).path


def coords_document(weights: list[SuperWeight], **meta: Any) -> dict[str, Any]:
    return {**meta, "super_weights": [w.to_dict() for w in weights]}


def write_coords(path: str | Path, weights: list[SuperWeight], **meta: Any) -> Path:
    """Write atomically; JSON when the name ends in .json, YAML otherwise."""
    path = Path(path)
    document = coords_document(weights, **meta)
    if path.suffix.lower() == ".json":
        text = json.dumps(document, indent=2) + "\n"
    else:
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)
    return path


def no_candidates_error(source: str, action: str, alternative: str = "") -> CoordinatesError:
    """Coordinates whose detection found nothing (a file, or a detect_model result: `source` names
    it) are refused, by every command, rather than acting on nothing (an ablation of nothing would
    pass for one of the super weights)."""
    return CoordinatesError(
        f"{source} holds no super weights (its detection found none), so there is nothing to "
        f"{action}; detect again with lower thresholds (--min-spike, --min-concentration, --min-share)"
        + (f", {alternative}" if alternative else ""))


def requested(coords_file: Any, coord_texts: list[str] | None, select: str = DEFAULT_SELECTION,
              say: Callable[[str], None] | None = None) -> list[SuperWeight]:
    """The weights a command acts on: the candidates of `--coords FILE` (or of a `detect_model`
    result: `coordinates`) that `--select` names (by their measured role), then each `--coord
    L,R,C` as given, without repeats. `say` gets one line saying which weights and why."""
    weights: list[SuperWeight] = []
    reasons = []
    if coords_file:
        given = coordinates(coords_file)
        candidates = given.weights
        if not candidates and not coord_texts:  # else the original model would pass as ablated
            raise no_candidates_error(given.name, "ablate", "or give --coord L,R,C")
        if candidates:
            selection = select_weights(candidates, select, given.name)
            weights += selection.weights
            reasons.append(selection.reason)
    if coord_texts:
        given = [parse_coord(text) for text in coord_texts]
        weights += given
        reasons.append(f"{len(given)} weight{'s' if len(given) != 1 else ''} given by --coord")
    unique: dict[tuple, SuperWeight] = {}
    for weight in weights:
        unique.setdefault(weight.key, weight)
    if say and reasons:
        say("acting on " + "; and ".join(reasons) + ": " + ", ".join(w.label() for w in unique.values()))
    return list(unique.values())


def weights_noun(weights: list[SuperWeight]) -> str:
    """What to call these weights (README: Vocabulary): "super weight" when every one was measured
    super or joint, "candidate" when they come from detection, else plain "weight"."""
    if all(w.role in ("super", "joint") for w in weights):
        return "super weight"
    if all(w.iteration is not None or w.role for w in weights):
        return "candidate"
    return "weight"


def weights_named(weights: list[SuperWeight]) -> str:
    """What a configuration acts on, in README's vocabulary, for a table row or a sentence: "super
    weight [11, 507, 1229]", "3 super weights" (every one measured super or joint), "5 candidates"
    (detection's, not all measured super), "2 weights" (given by coordinate, nothing measured)."""
    noun = weights_noun(weights)
    if len(weights) == 1:
        return f"{noun} {weights[0].label()}"
    return f"{len(weights)} {noun}s"


@dataclass(frozen=True)
class Selection:
    """The weights a command acts on, and a sentence saying which and why (printed by the command)."""

    weights: list[SuperWeight]
    reason: str


# Why a detection's candidates have no roles: verification measured the model as already broken.
UNVERIFIABLE = "verification gave no roles, the model being already broken or ablated"


def select_weights(weights: list[SuperWeight], selection: str, source: str,
                   unmeasured: str | None = None) -> Selection:
    """The candidates of `source` that `--select` names. Weights without a measured role (a file
    written without `--verify`; `unmeasured` says why, for a detection whose verification could not
    label them) cannot be told apart: then every candidate is taken, and the reason says so. A
    selection that leaves nothing is an error, never an unablated run."""
    roles = _SELECTED_ROLES[check_selection(selection)]
    every = "the only candidate" if len(weights) == 1 else f"all {len(weights)} candidates"
    if roles is None:
        return Selection(list(weights), f"{every} of {source} (--select all)")
    if not any(w.role for w in weights):
        why = unmeasured or "it records no measured roles"
        return Selection(list(weights), f"{every} of {source}: {why}, so super weights cannot be told from "
                                        "candidates" + ("" if unmeasured else " (make it with `sw detect --verify`)"))
    chosen = [w for w in weights if w.role in roles]
    plural = "s" if len(chosen) != 1 else ""
    what = f"super weight{plural} " + ("(role super)" if selection == "super" else "of the set (role super or joint)")
    if not chosen:
        found = ", ".join(sorted({w.role or "unmeasured" for w in weights}))
        raise CoordinatesError(f"--select {selection}: {source} holds no {what} (roles there: {found}); "
                               "use --select set or --select all, or give --coord L,R,C")
    return Selection(chosen, f"{len(chosen)} {what} of the {len(weights)} candidates in {source} (--select {selection})")
