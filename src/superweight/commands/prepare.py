"""One function per command: what `sw detect`, `sw eval`, `sw study`, ... do, for the CLI, every
rank of a distributed job, and a notebook alike.

Each function takes the command's options as plain Python arguments (same names, same defaults),
checks them and the outputs before anything slow, loads the model, runs, writes, and returns a
result object; the CLI only prints it. Progress goes to a `Reporter` (silent by default).

Under a launcher every rank calls the same function inside `distributed.session()`: detection
and verification run once (`on_main`), every rank reports in (`main_proceeds`) before an output is
written, and rank 0 alone writes and gets the result; the other ranks get None.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from .. import __version__

T = TypeVar("T")
Bar = Callable[[str, int, int], None]


class Reporter:
    """Where a command reports its progress. This one is silent; the CLI's draws spinners and bars.

    `say`: a message; `note`: a note from the library; `status(message)`: one long step, yielding a
    function that updates its text; `bars()`: staged work, yielding `bar(stage, done, total)`.
    """

    def say(self, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    @contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        yield lambda text: None

    @contextmanager
    def bars(self) -> Iterator[Bar]:
        yield lambda stage, done, total: None


# ----------------------------------------------------------------------------- shared steps


def slug(text: str) -> str:
    """A model's name as a file name (the default output names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if text.endswith(".gguf") else text).strip("-")


def _load(reporter: Reporter, spec: Optional[str], *, device_map: Optional[str], max_memory: Optional[str],
          **load_options):
    from ..model.devices import parse_device_map, parse_max_memory
    from ..model.load import load_model

    placement = dict(device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory))
    with reporter.status(f"loading {spec or 'default model'}") as update:
        loaded = load_model(spec, progress=update, notice=reporter.say, **placement, **load_options)
    reporter.say(f"loaded {loaded.source.spec} ({loaded.dtype}) in {loaded.load_seconds:.1f} s"
                 + (" from the GGUF cache" if loaded.from_cache else ""))
    for note in loaded.notes:
        reporter.note(note)
    return loaded


def _check_limit(limit: Optional[int], max_length: Optional[int] = None) -> None:
    """--limit and --max-length, before the model loads (the evaluator checks them again)."""
    from ..errors import UsageError

    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be a positive number of documents, got {limit}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {max_length}")


def _batch_size(value: int | str):
    """--batch-size as the evaluator takes it: a positive int, or "auto"."""
    from ..errors import UsageError

    text = str(value)
    if text == "auto":
        return "auto"
    if not (text.isdigit() and int(text) > 0):
        raise UsageError(f"--batch-size must be a positive integer or auto, got '{text}'")
    return int(text)


def _tasks_with_data(task: list[str] | str, data_dir: Optional[str], also: tuple[str, ...] = ()) -> list[str]:
    """The task names; missing data (of these and of `also`) fails now, not after loading the model."""
    from ..measure.tasks import load_task, resolve_task_names

    names = resolve_task_names(task)
    for name in dict.fromkeys([*names, *also]):
        load_task(name, data_dir, limit=1)
    return names


def _check_outputs(source, files=(), directory: Optional[Path] = None, force: bool = False) -> None:
    """Outputs are never inside the model's own files, are writable, and a non-empty output
    directory is only replaced with --force."""
    from ..errors import UsageError
    from ..files import check_writable, refuse_current_directory, refuse_inside

    if directory:  # checked again when written (atomic_directory); here before the slow work
        refuse_current_directory(directory)
    for path in filter(None, (*files, directory)):
        refuse_inside(path, source.protected_dirs)
        if path != directory and Path(path).is_dir():
            raise UsageError(f"{path} is a directory; give a file name for this output")
        if path == directory and path.is_dir() and any(path.iterdir()) and not force:
            raise UsageError(f"{path} exists and is not empty; choose another --out or pass --force to replace it")
        check_writable(path)


def _checked_coords(loaded, weights) -> None:
    from ..edit.validate import checked_coords

    if weights:
        checked_coords(loaded.model, weights)


def _step(bar: Bar, stage: str, work: Callable[[], T]) -> T:
    """A stage of one step (no finer progress to report): its bar, then `work()`."""
    bar(stage, 0, 1)
    result = work()
    bar(stage, 1, 1)
    return result


def _configuration_progress(bar: Bar):
    """`on_start`/`progress` for `run_configurations`: a bar per (configuration, task)."""
    current = {"configuration": ""}

    def on_start(configuration) -> None:
        current["configuration"] = configuration.name

    def on_progress(task_name: str, done: int, total: int) -> None:
        bar(f"{current['configuration']}: {task_name}", done, total)

    return on_start, on_progress


def _detected(reporter: Reporter, bar: Bar, loaded) -> list:
    """The super weights of the loaded model on the paper's prompt, found once (rank 0) for every rank."""
    from ..find.detect import DEFAULT_PROMPT, detect, encode_prompt
    from ..distributed import on_main

    weights = _step(bar, "detecting super weights", lambda: on_main(lambda: detect(
        loaded.model, encode_prompt(loaded.tokenizer, DEFAULT_PROMPT)).super_weights))
    reporter.say(f"detected super weights: {', '.join(w.label() for w in weights) or 'none'}")
    return weights


# ----------------------------------------------------------------------------- sw detect


@dataclass
class DetectionResult:
    """What `detect_model` found and wrote."""

    detection: Any  # detect.Detection: super_weights, per-layer stats, iterations
    verification: Any  # verify.Verification, with verify=True; else None
    known: Any  # report.KnownCheck against the paper's published coordinates, or None
    model: dict  # spec, location, kind, model_type, dtype
    coords_path: Path
    plot: Optional[Path]

    @property
    def super_weights(self) -> list:
        return self.detection.super_weights

    def to_dict(self) -> dict:
        """The `sw detect --json` document."""
        from ..report.detection import detection_document

        document = detection_document(self.detection, self.model, self.known)
        document["coordinates_file"] = str(self.coords_path)
        document["verification"] = self.verification.to_dict() if self.verification else None
        return document


def detect_model(model: Optional[str] = None, *, prompt: Optional[str] = None, iterations: Optional[int] = None,
                 min_spike: Optional[float] = None, min_concentration: Optional[float] = None,
                 min_share: Optional[float] = None, out: Optional[Path] = None, plot: Optional[Path] = None,
                 stream: bool = False, verify: bool = False, verify_text: Optional[Path] = None,
                 revision: Optional[str] = None, gguf_file: Optional[str] = None, dtype: str = "auto",
                 device: str = "auto", device_map: Optional[str] = None, max_memory: Optional[str] = None,
                 trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                 reporter: Optional[Reporter] = None) -> Optional[DetectionResult]:
    """`sw detect`: find the super weights, write the coordinates file (and the plot)."""
    from ..model.adapters import adapter_for_config, resolve_adapter, tensor_templates
    from ..coords import write_coords
    from ..find.detect import DEFAULT_ITERATIONS, DEFAULT_PROMPT, SpikeRule, detect, encode_prompt
    from ..distributed import main_proceeds
    from ..errors import UsageError
    from ..model.devices import parse_device_map, parse_max_memory
    from ..model.load import load_model
    from ..model.source import resolve
    from ..report.detection import check_known
    from ..report.plots import plot_activations

    reporter = reporter or Reporter()
    if not main_proceeds():  # under a launcher one detection is enough: rank 0's
        return None
    text = DEFAULT_PROMPT if prompt is None else prompt
    n = DEFAULT_ITERATIONS if iterations is None else iterations
    if n < 1:
        raise UsageError(f"--iterations must be at least 1, got {n}")
    if not text.strip():
        raise UsageError("--prompt is empty; give a non-empty prompt (default: the paper's sentence)")
    if stream and (device_map or max_memory):
        raise UsageError("--stream puts one layer at a time on --device; drop --device-map/--max-memory")
    if verify_text is not None and not verify:
        raise UsageError("--verify-text is the text --verify measures on; add --verify, or drop --verify-text")
    if verify and stream:
        raise UsageError("--verify needs the whole model loaded to measure perplexity; drop --stream "
                         "(or verify later with `sw eval --coords`)")
    if verify:
        from ..measure.verify import read_verify_text
        verify_source = read_verify_text(verify_text)  # a bad file fails before the model loads
    given = {"min_spike": min_spike, "min_concentration": min_concentration, "min_share": min_share}
    rule = SpikeRule(**{name: value for name, value in given.items() if value is not None})
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    coords_path = Path(out) if out else Path(f"{slug(source.alias or source.spec)}.superweights.yaml")
    plot = Path(plot) if plot else None
    _check_outputs(source, files=(coords_path, plot))
    with reporter.status(f"loading {source.spec}") as update:
        if stream:  # no weights loaded here: config and tokenizer only
            from ..find.stream import detect_streamed, open_checkpoint
            loaded = open_checkpoint(model, revision=revision, gguf_file=gguf_file, dtype=dtype,
                                     cache_dir=cache_dir, trust_remote_code=trust_remote_code, progress=update,
                                     notice=reporter.say)
        else:
            loaded = load_model(model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                                device_map=parse_device_map(device_map), max_memory=parse_max_memory(max_memory),
                                trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                                progress=update, notice=reporter.say)
        update(f"detecting: {n} iteration(s) at most" + (", one layer at a time" if stream else ""))
        input_ids = encode_prompt(loaded.tokenizer, text)
        if stream:
            detection = detect_streamed(loaded, input_ids, device=device, iterations=n, rule=rule, prompt=text)
        else:
            detection = detect(loaded.model, input_ids, iterations=n, rule=rule, prompt=text)
        verification = None
        if verify:
            from ..measure.verify import labelled, verify as run_verify
            verification = run_verify(loaded.model, loaded.tokenizer, detection.super_weights,
                                      text=verify_source[0], text_source=verify_source[1], rule=rule,
                                      iterations=n, progress=update)
            detection.super_weights = labelled(detection.super_weights, verification)
    reporter.say(f"{'opened' if stream else 'loaded'} {source.spec} ({loaded.dtype}) in "
                 f"{loaded.load_seconds:.1f} s" + (" from the GGUF cache" if loaded.from_cache else ""))
    config = loaded.config if stream else loaded.model.config
    model_info = {"spec": source.spec, "location": source.location, "kind": source.kind,
                  "model_type": config.model_type, "dtype": loaded.dtype}
    known = check_known(detection.super_weights, source.known_key, source.location)
    adapter, note = adapter_for_config(config) if stream else resolve_adapter(loaded.model)
    if note:
        reporter.note(note)
    write_coords(coords_path, detection.super_weights, model=source.spec,
                 model_type=config.model_type, **tensor_templates(adapter),
                 prompt=text, tool=f"superweight {__version__}")
    if plot:
        plot_activations(detection, plot, title=f"{source.spec}: down-projection activations")
    return DetectionResult(detection=detection, verification=verification, known=known, model=model_info,
                           coords_path=coords_path, plot=plot)


# ----------------------------------------------------------------------------- sw ablate


@dataclass
class AblationResult:
    """What `ablate_model` changed and where it wrote the model."""

    out: Path
    record: Any  # ablate.AblationRecord: coordinates, original values, mode, control
    changed: int  # how many weights
    control: Optional[str]
    mode: str  # zero | scale
    factor: float

    def to_dict(self) -> dict:
        """The `sw ablate --json` document."""
        return {"out": str(self.out), "ablation": self.record.to_dict()}


def ablate_model(model: Optional[str] = None, *, out: Path, coords: Optional[Path] = None,
                 coord: Optional[list[str]] = None, mode: Optional[str] = None, factor: Optional[str] = None,
                 control: Optional[str] = None, top: Optional[int] = None, seed: int = 0, force: bool = False,
                 revision: Optional[str] = None, gguf_file: Optional[str] = None, dtype: str = "auto",
                 device: str = "auto", device_map: Optional[str] = None, max_memory: Optional[str] = None,
                 trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                 reporter: Optional[Reporter] = None) -> Optional[AblationResult]:
    """`sw ablate`: zero or rescale the super weights (or a control) and save the model to `out`."""
    from ..edit import ablate as ablation
    from ..edit.save import save_ablated
    from ..edit.validate import check_coords_before_load
    from ..coords import requested
    from ..distributed import main_proceeds
    from ..errors import UsageError
    from ..measure.configurations import check_control, control_weights, parse_factor
    from ..model.source import resolve

    reporter = reporter or Reporter()
    if not main_proceeds():  # under a launcher rank 0 alone writes the model
        return None
    out = Path(out)
    factor = None if factor is None else str(factor)
    how, value = parse_factor(factor, mode)
    if mode is None and factor is not None:
        reporter.say(f"--factor {factor} given: scaling the weights (--mode scale)")
    check_control(control, top)
    weights = requested(coords, coord)
    if not weights:
        raise UsageError("no coordinates given; pass --coords FILE (from `sw detect`) or --coord LAYER,ROW,COL")
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    _check_outputs(source, directory=out, force=force)
    check_coords_before_load(source, weights, trust_remote_code=trust_remote_code)
    loaded = _load(reporter, model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                   device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
                   cache_dir=cache_dir)
    _checked_coords(loaded, weights)
    targets = control_weights(loaded.model, weights, control, seed=seed, top=top) if control else weights
    record = ablation.apply(loaded.model, targets, mode=how, factor=value, control=control,
                            seed=seed if control == "random" else None,
                            top=top if control == "outliers" else None,
                            reference=weights if control else None)
    with reporter.status(f"writing {out}"):
        save_ablated(loaded, record, out, force=force)
    return AblationResult(out=out, record=record, changed=len(targets), control=control, mode=how, factor=value)


# ----------------------------------------------------------------------------- sw eval


@dataclass
class EvaluationResult:
    """The metrics of every evaluated configuration, and the document `--output` holds."""

    runs: dict  # configuration name -> lm-eval layout results of its tasks
    document: dict  # the `sw eval --json` / `--output` document
    output: Optional[Path]
    harness_computed_by: Optional[str] = None  # with harness tasks: who computed their columns

    @property
    def spec(self) -> str:
        return self.document["model"]["spec"]

    def to_dict(self) -> dict:
        return self.document

    def table(self):
        """Configurations by metric (experiments.SummaryTable: columns, rows)."""
        from ..measure.configurations import summary_table

        return summary_table(self.runs)


def evaluate_model(model: Optional[str] = None, *, task: Optional[list[str]] = None,
                   harness: Optional[list[str]] = None, harness_include: Optional[list[Path]] = None,
                   coords: Optional[Path] = None, coord: Optional[list[str]] = None, mode: Optional[str] = None,
                   factor: Optional[str] = None, control: Optional[str] = None, top: Optional[int] = None,
                   restore_activation: bool = False, compare: bool = False, data_dir: Optional[str] = None,
                   limit: Optional[int] = None, batch_size: int | str = "auto", max_length: Optional[int] = None,
                   seed: int = 0, output: Optional[Path] = None, revision: Optional[str] = None,
                   gguf_file: Optional[str] = None, dtype: str = "auto", device: str = "auto",
                   device_map: Optional[str] = None, max_memory: Optional[str] = None,
                   trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                   reporter: Optional[Reporter] = None) -> Optional[EvaluationResult]:
    """`sw eval`: perplexity and zero-shot accuracy, of the model as given or ablated in memory
    (`coords`/`coord`), or of the paper's Table 1 layout (`compare`); `output` gets the results."""
    from ..edit.save import describe_recorded_ablation, recorded_ablation
    from ..edit.validate import check_coords_before_load
    from ..coords import requested
    from ..distributed import main_proceeds
    from ..errors import UsageError
    from ..measure.configurations import check_control, comparison_configurations, parse_factor, run_configurations, \
        single_configuration
    from ..files import atomic_write_text
    from ..measure.harness import HarnessTasks, check_harness_tasks
    from ..model.source import resolve

    reporter = reporter or Reporter()
    factor = None if factor is None else str(factor)
    output = Path(output) if output else None
    if isinstance(task, str):
        task = [task]
    if compare and (mode not in (None, "zero") or factor is not None):
        raise UsageError("--compare evaluates the paper's zeroing layout; drop --mode/--factor, or drop --compare")
    how, value = parse_factor(factor, mode)
    if mode is None and factor is not None:
        reporter.say(f"--factor {factor} given: scaling the weights (--mode scale)")
    check_control(control, top)
    _check_limit(limit, max_length)
    batch = _batch_size(batch_size)
    names = _tasks_with_data(task or ["wikitext"], data_dir) if task or not harness else []
    lm_eval_tasks = None
    if harness or harness_include:
        lm_eval_tasks = HarnessTasks(tuple(harness or ()), tuple(map(str, harness_include or ())))
        check_harness_tasks(lm_eval_tasks, builtin=names)
    weights = requested(coords, coord)
    if (compare or restore_activation or control) and not weights:
        raise UsageError("--compare, --restore-activation and --control need --coords FILE or --coord L,R,C")
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    _check_outputs(source, files=(output,))
    prior = recorded_ablation(source)
    unchanged = describe_recorded_ablation(prior) if prior else "original"
    check_coords_before_load(source, weights, trust_remote_code=trust_remote_code)
    loaded = _load(reporter, model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                   device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
                   cache_dir=cache_dir)
    _checked_coords(loaded, weights)
    if compare:
        configurations = comparison_configurations(loaded.model, weights, control=control, seed=seed, top=top,
                                                   unchanged=unchanged)
    else:
        configurations = [single_configuration(loaded.model, weights, mode=how, factor=value,
                                               restore_activation=restore_activation, control=control,
                                               seed=seed, top=top, unchanged=unchanged)]
    with reporter.bars() as bar:
        on_start, on_progress = _configuration_progress(bar)
        runs = run_configurations(
            loaded.model, loaded.tokenizer, configurations, names, on_start=on_start, data_dir=data_dir,
            limit=limit, batch_size=batch, max_length=max_length, seed=seed, progress=on_progress,
            harness=lm_eval_tasks)
    if not main_proceeds():  # every rank got here: rank 0 writes and prints
        return None
    document = runs[configurations[0].name] if len(runs) == 1 else {"configurations": runs}
    document["model"] = {"spec": source.spec, "location": source.location, "kind": source.kind,
                         "dtype": loaded.dtype, "superweight_ablation": prior}
    document["tool"] = f"superweight {__version__}"
    if output:
        atomic_write_text(output, json.dumps(document, indent=2) + "\n")
    return EvaluationResult(runs=runs, document=document, output=output,
                            harness_computed_by=lm_eval_tasks.describe()["computed_by"] if lm_eval_tasks else None)


# ----------------------------------------------------------------------------- sw study


@dataclass
class StudyResult:
    """The paper's analysis of one model, as written to `out` (REPORT.md, report.json, plots)."""

    out: Path
    table: Any  # experiments.SummaryTable: Table 1's configurations by metric
    super_weights: list
    runs: dict  # configuration name -> results (Table 1 and the scale sweep)
    meta: dict  # model, tasks, limit, seed, grid, evaluations (total, from_cache), seconds

    @property
    def report(self) -> Path:
        from ..report.study import REPORT_FILE

        return self.out / REPORT_FILE

    @property
    def json_path(self) -> Path:
        from ..report.study import JSON_FILE

        return self.out / JSON_FILE

    def to_dict(self) -> dict:
        """report.json, as written."""
        return json.loads(self.json_path.read_text(encoding="utf-8"))


def run_study(model: Optional[str] = None, *, coords: Optional[Path] = None, coord: Optional[list[str]] = None,
              task: list[str] | str = ("all",), limit: Optional[int | str] = None, top: Optional[int] = None,
              grid: Optional[str] = None, stop_words: Optional[Path] = None, out: Optional[Path] = None,
              force: bool = False, data_dir: Optional[str] = None, batch_size: int | str = "auto",
              max_length: Optional[int] = None, seed: int = 0, revision: Optional[str] = None,
              gguf_file: Optional[str] = None, dtype: str = "auto", device: str = "auto",
              device_map: Optional[str] = None, max_memory: Optional[str] = None, trust_remote_code: bool = False,
              cache_dir: Optional[str] = None, command: Optional[str] = None,
              reporter: Optional[Reporter] = None) -> Optional[StudyResult]:
    """`sw study`: Table 1, the scale sweep, the stop-word shift, the activation profile and
    generations, written to `out` (default ./<model>-study); cached evaluations are not run again.
    `limit`: documents per task, or "all"; without it a CPU run reads `study_runs.CPU_LIMIT` documents of
    each zero-shot task and `study_runs.CPU_WIKITEXT_LIMIT` of wikitext, an accelerator run all of them.
    `command` is recorded in the report as the command line that asked for it."""
    from ..edit.validate import check_coords_before_load
    from ..measure import generate as generation
    from ..measure import study_runs
    from ..measure.activation_profile import activation_profile
    from ..measure.stop_words import cached_stop_word_shift, load_stop_words
    from ..report import study as analysis
    from ..coords import requested
    from ..find.detect import DEFAULT_PROMPT, encode_prompt
    from ..distributed import main_proceeds, on_main
    from ..errors import UsageError
    from ..measure.configurations import summary_table
    from ..model.load import model_fingerprint
    from ..model.source import cache_root, resolve
    from ..model.placement import execution_device

    reporter = reporter or Reporter()
    started = time.perf_counter()
    factors = study_runs.parse_grid(grid)
    limit = study_runs.parse_limit(limit)
    _check_limit(None if limit == study_runs.ALL_DOCUMENTS else limit, max_length)
    batch = _batch_size(batch_size)
    if top is not None and top <= 0:
        raise UsageError(f"--top must be a positive number of weights, got {top}")
    names = _tasks_with_data(list(task) if not isinstance(task, str) else task, data_dir,
                             also=("wikitext",))  # the stop-word shift reads wikitext
    words = load_stop_words(stop_words)
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    out_dir = Path(out) if out else Path(f"{slug(source.alias or source.spec)}-study")
    _check_outputs(source, directory=out_dir, force=force)
    weights = requested(coords, coord)
    check_coords_before_load(source, weights, trust_remote_code=trust_remote_code)
    loaded = _load(reporter, model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                   device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
                   cache_dir=cache_dir)
    _checked_coords(loaded, weights)
    model_key = model_fingerprint(loaded)
    cache = study_runs.EvaluationCache(cache_root(cache_dir) / "evaluations")
    prompt_ids = encode_prompt(loaded.tokenizer, DEFAULT_PROMPT)
    on_cpu = execution_device(loaded.model).type == "cpu"
    cpu_budget = limit is None and on_cpu
    limits = study_runs.task_limits(names, limit, on_cpu)
    documents = study_runs.documents_note(limits)
    if cpu_budget:
        reporter.note(f"reading {documents} ({study_runs.CPU_BUDGET_NOTE})")
    with reporter.bars() as bar:
        if not weights:
            weights = _detected(reporter, bar, loaded)
        verification = None
        if weights:
            from ..measure.verify import labelled, verify
            verification = _step(bar, "measuring each weight's effect",
                                 lambda: on_main(lambda: verify(loaded.model, loaded.tokenizer, weights)))
            weights = labelled(weights, verification)
        table_configurations = study_runs.study_configurations(loaded.model, weights, top=top, seed=seed)
        sweep = study_runs.scale_sweep_configurations(weights, factors)
        on_start, on_progress = _configuration_progress(bar)
        runs = study_runs.run_cached(
            cache, model_key, loaded.model, loaded.tokenizer, table_configurations + sweep, names,
            on_start=on_start, progress=on_progress, data_dir=data_dir, limit=limits,
            batch_size=batch, max_length=max_length, seed=seed)
        shift, shift_cached = on_main(lambda: cached_stop_word_shift(
            cache, model_key, loaded.model, loaded.tokenizer, weights, words, data_dir=data_dir,
            limit=study_runs.task_limits(["wikitext"], limit, on_cpu)["wikitext"],  # read even when not a task
            max_length=max_length, progress=lambda done, total: bar("stop-word shift", done, total)))
        if shift_cached:
            bar("stop-word shift (from the cache)", 1, 1)
        profile = _step(bar, "activation profile",
                        lambda: activation_profile(loaded.model, prompt_ids, weights))
        generations = _step(bar, "generations", lambda: on_main(
            lambda: generation.generate(loaded.model, loaded.tokenizer, table_configurations)))
        if not main_proceeds():  # every rank got here: rank 0 writes and prints
            return None
        table = summary_table({c.name: runs[c.name] for c in table_configurations})
        cached = sum(len(runs[c.name]["cached_tasks"]) for c in table_configurations + sweep)
        meta = {"command": command,
                "model": {"spec": source.spec, "location": source.location, "dtype": loaded.dtype},
                "tasks": names, "limit": limit, "documents": limits, "documents_note": documents,
                "cpu_budget": cpu_budget, "seed": seed, "grid": factors,
                "evaluations": {"total": len(names) * len(table_configurations + sweep), "from_cache": cached},
                "seconds": round(time.perf_counter() - started, 1), "tool": f"superweight {__version__}"}
        _step(bar, f"writing {out_dir}", lambda: analysis.write_report(
            out_dir, force=force, super_weights=weights, table=table, sweep_rows=study_runs.sweep_rows(runs, sweep),
            stop_words=shift, profile=profile, meta=meta, verification=verification, generations=generations))
    return StudyResult(out=out_dir, table=table, super_weights=weights, runs=runs, meta=meta)


# ----------------------------------------------------------------------------- sw quantize


@dataclass
class QuantizationResult:
    """Naive vs super-weight-aware round-to-nearest, per block size (and per activation width)."""

    document: dict  # the `sw quantize --json` document
    rows: list  # one per block size: baseline, naive and aware results
    activation_rows: list  # with activations=True: one per bit width
    spec: str
    bits: int
    z: float | str  # the clipping threshold, or "auto"

    def to_dict(self) -> dict:
        return self.document

    def weight_table(self):
        from ..measure.configurations import summary_table
        from ..measure.quantized import comparison_runs

        return summary_table(comparison_runs(self.rows, lambda r: f"block {r['block_size']}"))

    def activation_table(self):
        from ..measure.configurations import summary_table
        from ..measure.quantized import comparison_runs

        return summary_table(comparison_runs(self.activation_rows, lambda r: f"{r['bits']}-bit"))


def _save_quantized(loaded, out: Path, force: bool, settings: dict) -> None:
    """The fake-quantized (dequantized values) model as safetensors, written atomically."""
    from ..files import atomic_directory

    with atomic_directory(out, force=force) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "superweight_quantization.json").write_text(json.dumps(
            {"source": loaded.source.spec, "location": loaded.source.location, **settings,
             "tool": f"superweight {__version__}"}, indent=2) + "\n")


def quantize_model(model: Optional[str] = None, *, coords: Optional[Path] = None, coord: Optional[list[str]] = None,
                   bits: int = 4, block_size: Optional[list[int | str]] = None, z: float | str = "9",
                   activations: bool = False, activation_bits: int = 8, task: list[str] | str = ("wikitext",),
                   data_dir: Optional[str] = None, limit: Optional[int] = None, max_length: Optional[int] = None,
                   plot: Optional[Path] = None, out: Optional[Path] = None, force: bool = False,
                   revision: Optional[str] = None, gguf_file: Optional[str] = None, dtype: str = "auto",
                   device: str = "auto", device_map: Optional[str] = None, max_memory: Optional[str] = None,
                   trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                   reporter: Optional[Reporter] = None) -> Optional[QuantizationResult]:
    """`sw quantize`: evaluate INT`bits` RTN with and without the super weights held out, per block
    size; `plot` draws the sweep, `out` saves the aware model (one block size)."""
    from ..edit import quantize as rtn
    from ..edit.validate import check_coords_before_load
    from ..measure.quantized import activation_quantization_compare, weight_quantization_sweep
    from ..report.plots import plot_sweep
    from ..coords import requested
    from ..distributed import main_proceeds
    from ..errors import UsageError
    from ..model.source import resolve

    reporter = reporter or Reporter()
    plot = Path(plot) if plot else None
    out = Path(out) if out is not None else None
    sizes = None
    if block_size:
        texts = [str(size) for size in block_size]
        bad = next((text for text in texts if not text.strip().lstrip("-").isdigit()), None)
        if bad is not None:
            raise UsageError(f"--block-size must be a positive integer, got '{bad}'")
        sizes = [int(text) for text in texts]
        rtn.check_block_sizes(sizes)
    rtn.check_bits(bits)
    rtn.check_bits(activation_bits, "activation")
    z_value = rtn.parse_z(str(z))
    _check_limit(limit, max_length)
    names = _tasks_with_data(list(task) if not isinstance(task, str) else task, data_dir)
    if out is not None and (not sizes or len(sizes) != 1):
        raise UsageError("--out saves one quantized model: give exactly one --block-size with it")
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    _check_outputs(source, files=(plot,), directory=out, force=force)
    weights = requested(coords, coord)
    check_coords_before_load(source, weights, trust_remote_code=trust_remote_code)
    loaded = _load(reporter, model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                   device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
                   cache_dir=cache_dir)
    _checked_coords(loaded, weights)
    grid = sizes or rtn.default_block_sizes(loaded.model)
    options = dict(data_dir=data_dir, limit=limit, max_length=max_length)
    with reporter.bars() as bar:
        if not weights:
            weights = _detected(reporter, bar, loaded)
        rows = weight_quantization_sweep(loaded.model, loaded.tokenizer, weights, grid, bits=bits, z=z_value,
                                         tasks=names, baseline=True, progress=bar, **options)
        activation_rows = (activation_quantization_compare(loaded.model, loaded.tokenizer, weights,
                                                           bits=activation_bits, tasks=names, progress=bar,
                                                           **options)
                           if activations else [])
    if not main_proceeds():  # every rank got here: rank 0 writes and prints
        return None
    if plot:
        plot_sweep(rows, plot, title=f"{source.spec}: INT{bits} round-to-nearest")
    if out is not None:
        with rtn.quantized_weights(loaded.model, bits=bits, block_size=grid[0], super_weights=weights,
                                   z=z_value) as record:
            _save_quantized(loaded, out, force, {"bits": bits, "block_size": grid[0], "z": z_value,
                                                 **({"chosen_z": record.to_dict()["chosen_z"]}
                                                    if z_value == rtn.AUTO_Z else {}),
                                                 "super_weights": [w.to_dict() for w in weights]})

    def without_baseline(row: dict) -> dict:  # the unquantized results appear once, at the top
        return {k: v for k, v in row.items() if k != "baseline"}

    document = {"model": {"spec": source.spec, "location": source.location}, "bits": bits, "z": z_value,
                "super_weights": [w.to_dict() for w in weights],
                "unquantized": rows[0].get("baseline") if rows else None,
                "weights": [without_baseline(r) for r in rows],
                "activations": [without_baseline(r) for r in activation_rows],
                "tool": f"superweight {__version__}"}
    return QuantizationResult(document=document, rows=rows, activation_rows=activation_rows, spec=source.spec,
                              bits=bits, z=z_value)


# ----------------------------------------------------------------------------- sw generate


@dataclass
class GenerationResult:
    """Greedy continuations of each prompt under each configuration."""

    model: dict  # spec, location, dtype
    prompts: list[str]
    max_new_tokens: int
    configurations: list  # experiments.Configuration: original, zeroed, restored, control
    generations: list  # generate.Generation: configuration, prompt, text

    def to_dict(self) -> dict:
        """The `sw generate --json` document."""
        return {"model": self.model, "max_new_tokens": self.max_new_tokens, "decoding": "greedy",
                "configurations": [c.describe() for c in self.configurations],
                "generations": [g.to_dict() for g in self.generations], "tool": f"superweight {__version__}"}


def generate_text(model: Optional[str] = None, *, coords: Optional[Path] = None, coord: Optional[list[str]] = None,
                  prompt: Optional[list[str]] = None, max_new_tokens: int = 16, control: Optional[str] = None,
                  top: Optional[int] = None, seed: int = 0, revision: Optional[str] = None,
                  gguf_file: Optional[str] = None, dtype: str = "auto", device: str = "auto",
                  device_map: Optional[str] = None, max_memory: Optional[str] = None,
                  trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                  reporter: Optional[Reporter] = None) -> Optional[GenerationResult]:
    """`sw generate`: greedy continuations, original vs super weights zeroed vs zeroed with the
    activation restored vs a control (the super weights detected when none are given). Under a
    launcher rank 0 alone detects and decodes (the work is a few greedy tokens); the other ranks get None."""
    from ..measure import generate as generation
    from ..coords import requested
    from ..find.detect import DEFAULT_PROMPT, detect, encode_prompt
    from ..distributed import main_proceeds, on_main
    from ..measure.configurations import comparison_configurations
    from ..model.source import resolve

    reporter = reporter or Reporter()
    if isinstance(prompt, str):
        prompt = [prompt]
    prompts = generation.check_prompts(prompt)
    generation.check_max_new_tokens(max_new_tokens)
    weights = requested(coords, coord)
    source = resolve(model, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    loaded = _load(reporter, model, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device,
                   device_map=device_map, max_memory=max_memory, trust_remote_code=trust_remote_code,
                   cache_dir=cache_dir)
    if weights:
        _checked_coords(loaded, weights)
    else:
        weights = on_main(lambda: detect(loaded.model, encode_prompt(loaded.tokenizer, DEFAULT_PROMPT)).super_weights)
        reporter.say(f"detected super weights: {', '.join(w.label() for w in weights) or 'none'}")
    configurations = comparison_configurations(loaded.model, weights, control=control, seed=seed, top=top)
    with reporter.status(f"generating {max_new_tokens} tokens x {len(prompts)} prompt(s) x "
                         f"{len(configurations)} configurations"):
        generations = on_main(lambda: generation.generate(loaded.model, loaded.tokenizer, configurations, prompts,
                                                          max_new_tokens=max_new_tokens))
    if not main_proceeds():  # every rank got here: rank 0 prints
        return None
    return GenerationResult(model={"spec": source.spec, "location": source.location, "dtype": loaded.dtype},
                            prompts=prompts, max_new_tokens=max_new_tokens, configurations=configurations,
                            generations=generations)


# ----------------------------------------------------------------------------- sw export


@dataclass
class ExportResult:
    """What a quantizer needs to keep the super weights' matrices in high precision."""

    export: Any  # export.Export: content, modules, gguf_tensors, usage, checked
    out: Optional[Path]

    @property
    def content(self) -> str:
        return self.export.content

    def to_dict(self) -> dict:
        """The `sw export --json` document."""
        return {**self.export.to_dict(), "out": str(self.out) if self.out else None}


def export_names(coords_file: Path, *, to: str, model: Optional[str] = None, gguf: Optional[Path] = None,
                 ggml_type: str = "f16", out: Optional[Path] = None, revision: Optional[str] = None,
                 gguf_file: Optional[str] = None, trust_remote_code: bool = False, cache_dir: Optional[str] = None,
                 reporter: Optional[Reporter] = None) -> ExportResult | None:
    """`sw export`: the super weights' matrices under this model's own names, in the format of
    llama.cpp, bitsandbytes or llm-compressor, checked against the model; written to `out` if given.
    Under a launcher rank 0 alone exports (the others return None): one writer."""
    from ..edit import export as handoff
    from ..coords import read_coords
    from ..distributed import main_proceeds
    from ..files import atomic_write_text
    from ..model.source import resolve

    if not main_proceeds():
        return None
    reporter = reporter or Reporter()
    out = Path(out) if out is not None else None
    handoff.check_format(to)
    weights, meta = read_coords(coords_file)
    spec = model or (meta.get("model") if isinstance(meta.get("model"), str) else None)
    source = resolve(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    if out is not None:
        _check_outputs(source, files=(out,))
    with reporter.status(f"checking names against {source.spec}") as update:
        result = handoff.export(weights, to, spec=spec, revision=revision, gguf_file=gguf_file,
                                cache_dir=cache_dir, trust_remote_code=trust_remote_code, gguf=gguf,
                                ggml_type=ggml_type, out_name=str(out or "FILE"), progress=update)
    if out is not None:
        atomic_write_text(out, result.content)
    return ExportResult(export=result, out=out)
