"""Whether a checkpoint is whole, before anything is measured on it.

transformers loads a checkpoint that lacks tensors (a lost shard, a config.json that describes
more layers than the weights hold) by filling the gaps with random values, and says so only in a
log message the CLI hides; a truncated weight file fails deep inside safetensors without naming
the file. Each of these becomes a one-line `ModelLoadError` here:

- `weight_file_problem`: a safetensors file judged from its header and size alone (no tensor
  read): truncated, or a header that does not parse. `damaged_weight_file` finds the first such
  file of a checkpoint (or of its PyTorch pickles, empty or a zip cut short: `pickle_file_problem`).
- `check_complete`: transformers' loading report (missing, unexpected and mismatched-shape
  tensors). What transformers recreates itself (a tied LM head, non-persistent buffers such as
  rotary tables) never appears in that report, so it is no error.
- `check_finite_weights`: a weight in memory holding NaN or inf, named, at load (one float32 sum
  per tensor); `check_finite_offloaded_down_projections` reads the offloaded down projections.
- `non_finite_error`: why a forward pass came out NaN or inf (detection checks the stream leaving
  the last decoder layer, evaluation the scores of the model as given): the first tensor holding
  one, named, else an overflow of the dtype. Only then is every weight read.
- `write_manifest` / `manifest_problem`: what a cache entry must hold, recorded when it is
  written and compared when it is used (sizes and tensor shapes; a flipped bit inside the data
  is not seen, except by the finite check where it lands in a down projection).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

from ..errors import ModelLoadError

MANIFEST = "superweight-manifest.json"
_FLOATS = ("float16", "bfloat16", "float32", "float64")  # dtypes isfinite is defined (and cheap) for


# ----------------------------------------------------------------------------- weight files


def _header(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the safetensors header of `path` without its metadata entry, None) or (None, what is wrong)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                return None, f"{size} bytes: too short for a safetensors file"
            length = int.from_bytes(f.read(8), "little")
            if 8 + length > size:
                return None, f"truncated: {size} bytes, less than its header alone ({8 + length})"
            header = json.loads(f.read(length))
        tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable: {e.strerror or type(e).__name__}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None, "its header is corrupt"
    expected = 8 + length + end
    if size < expected:
        return None, f"truncated: {size} of {expected} bytes"
    if size > expected:
        return None, f"corrupt: {size - expected} bytes more than its header describes"
    return tensors, None


def weight_file_problem(path: str | Path) -> str | None:
    """What is wrong with the safetensors file `path` (truncated, corrupt header, missing), or None."""
    return _header(Path(path))[1]


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the safetensors file `path`, from its header; a damaged file raises
    the `ModelLoadError` of `damaged_file_error`."""
    tensors, problem = _header(Path(path))
    if problem:
        raise damaged_file_error(path, problem)
    return {name: tuple(entry["shape"]) for name, entry in tensors.items()}


SHARD_INDEX = "model.safetensors.index.json"


def shard_map(directory: str | Path) -> dict[str, Path] | None:
    """Which file holds each tensor, from a sharded checkpoint's index (None without one); an index
    that is not JSON or has no weight_map of names to files is refused in one line."""
    index = Path(directory) / SHARD_INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(name): Path(directory) / file for name, file in weight_map.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{index} is corrupt (no readable weight_map); download or copy it again") from None


def weight_files(directory: str | Path) -> list[Path]:
    """A checkpoint directory's safetensors files: those its shard index names, else model*.safetensors."""
    shards = shard_map(directory)
    if shards is not None:
        return sorted(set(shards.values()))
    return sorted(Path(directory).glob("model*.safetensors"))


def pickle_file_problem(path: Path) -> str | None:
    """What is wrong with a PyTorch weight file (pytorch_model*.bin), judged without unpickling it:
    empty, or a zip archive (torch.save's format since torch 1.6) cut short; None otherwise (an
    older, non-zip file cannot be judged from outside)."""
    with open(path, "rb") as f:
        start = f.read(4)
    if not start:
        return "0 bytes"
    if start.startswith(b"PK") and not zipfile.is_zipfile(path):
        return f"truncated: {path.stat().st_size} bytes, not a complete zip archive"
    return None


def damaged_weight_file(directory: str | Path) -> tuple[Path, str] | None:
    """The first damaged weight file of a checkpoint directory and what is wrong with it, or None:
    its safetensors files, else (transformers reads them only then) its PyTorch pickles."""
    files = weight_files(directory)
    for path in files:
        problem = weight_file_problem(path)
        if problem:
            return path, problem
    if not files:
        for path in sorted(Path(directory).glob("pytorch_model*.bin")):
            problem = pickle_file_problem(path)
            if problem:
                return path, problem
    return None


def damaged_file_error(path: str | Path, problem: str) -> ModelLoadError:
    if problem == "missing":  # a shard the index names, lost in a copy or an interrupted download
        return ModelLoadError(f"weight file {path} is missing (the checkpoint's {SHARD_INDEX} names it); "
                              "download or copy the model again")
    return ModelLoadError(f"weight file {path} is damaged ({problem}); download or copy the model again")


# ----------------------------------------------------------------------------- the loading report


def _numbers(values: list[int]) -> str:
    """11 -> '11'; 30..39 -> '{30..39}'; 2, 5 -> '{2,5}' (runs of consecutive numbers as ranges)."""
    runs: list[list[int]] = []
    for value in sorted(set(values)):
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}" for run in runs)
    return text if len(runs) == 1 and len(runs[0]) == 1 else f"{{{text}}}"


def grouped(names: Iterable[str], shown: int = 3) -> str:
    """Tensor names in a few groups: 'model.layers.11.*' for several tensors of one layer,
    'model.layers.{30..39}.*' for the same tensors of several layers, a lone name as itself."""
    by_head: dict[str, dict[int, set[str]]] = {}
    alone: list[str] = []
    for name in sorted(names):
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", name)
        if match:
            by_head.setdefault(match[1], {}).setdefault(int(match[2]), set()).add(match[3])
        else:
            alone.append(name)
    groups: list[str] = []
    for head, layers in by_head.items():
        same_tensors: dict[frozenset[str], list[int]] = {}
        for number, tails in layers.items():
            same_tensors.setdefault(frozenset(tails), []).append(number)
        for tails, numbers in sorted(same_tensors.items(), key=lambda item: min(item[1])):
            tail = next(iter(tails)) if len(tails) == 1 else "*"
            groups.append(f"{head}.{_numbers(numbers)}.{tail}")
    groups += alone
    more = f" and {len(groups) - shown} more groups" if len(groups) > shown else ""
    return ", ".join(groups[:shown]) + more


def check_complete(loading_info: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose loading report (from_pretrained's `output_loading_info`, or the
    same keys built by the streaming reader) lists missing, unexpected or mismatched-shape tensors."""
    missing = set(loading_info.get("missing_keys") or ())
    unexpected = set(loading_info.get("unexpected_keys") or ())
    mismatched = sorted(loading_info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are not in its weight files ({grouped(missing)})")
    if mismatched:
        name, stored, expected = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        parts.append(f"{len(mismatched)} have another shape than config.json gives "
                     f"({name}: {list(stored)} stored, {list(expected)} expected{more})")
    if unexpected:
        parts.append(f"{len(unexpected)} in its weight files are not part of the model config.json describes "
                     f"({grouped(unexpected)})")
    raise ModelLoadError(
        f"{where} is incomplete or does not match its config.json: {'; '.join(parts)}; "
        "transformers would fill the gaps with random values. Download or copy the model again "
        "(a lost shard?), or make config.json match its weights"
    )


# ----------------------------------------------------------------------------- values


def non_finite_count(weight: Any) -> int:
    """How many NaN or inf `weight` holds; 0 for storage not checked here (meta: offloaded or not
    yet loaded; integer: quantized)."""
    import torch

    if weight.is_meta or str(weight.dtype).removeprefix("torch.") not in _FLOATS:
        return 0
    # One float32 sum first: a NaN or inf anywhere makes it NaN or inf (weights cannot add up to
    # float32's limit). It reads the tensor at memory speed and allocates nothing: about 10x
    # faster than isfinite's mask, as large as its input (SmolLM2's 135M values: 28-30 ms vs 278-307 ms,
    # scripts/bench_finite_check.py).
    if bool(torch.isfinite(weight.detach().sum(dtype=torch.float32))):
        return 0
    return int(sum((~torch.isfinite(part)).sum() for part in (weight if weight.dim() == 3 else [weight])))


def corrupt_tensor_error(name: str, bad: int) -> ModelLoadError:
    return ModelLoadError(
        f"{name} holds {bad} NaN or infinite values: the checkpoint is corrupt (or was saved "
        "from a diverged run); download or copy the model again"
    )


def check_finite_offloaded_down_projections(model: Any) -> None:
    """Refuse a model whose down projections that accelerate offloaded hold NaN or inf, naming the
    first: each is read once from where accelerate keeps them (those in memory are
    `check_finite_weights`'s; the other offloaded weights are left to the pass, which shows a NaN
    that reaches the output, rather than read the whole offloaded model once more)."""
    from .adapters import adapter_for, decoder_layers, down_proj_tensor, is_moe_layer, tensor_name
    from .placement import stored_tensor

    adapter = adapter_for(model)
    for layer in range(len(decoder_layers(model, adapter))):
        checked = [(down_proj_tensor(model, layer, adapter=adapter), tensor_name(model, layer, adapter))]
        if adapter.shared_expert and is_moe_layer(model, layer, adapter):
            checked.append((down_proj_tensor(model, layer, "shared", adapter),
                            tensor_name(model, layer, adapter, "shared")))
        for (module, attribute), name in checked:
            if not getattr(module, attribute).is_meta:
                continue  # in memory: check_finite_weights summed it
            if bad := non_finite_count(stored_tensor(module, attribute, writable=False)):
                raise corrupt_tensor_error(name, bad)


def check_finite_weights(module: Any, prefix: str = "") -> None:
    """Refuse a model (or one streamed decoder layer, its names under `prefix`) whose weights in
    memory hold NaN or inf, naming the first. Every weight counts: a NaN in an attention
    projection need not reach the output (PyTorch's causal attention on the CPU turns a row of
    NaN scores into zeros), so no forward pass can be trusted to show it."""
    if error := corrupt_tensor((prefix + name, tensor) for name, tensor in module.named_parameters()):
        raise error


def corrupt_tensor(tensors: Iterable[tuple[str, Any]]) -> ModelLoadError | None:
    """The error naming the first of `tensors` (name, tensor) that holds NaN or inf, or None.
    `model.named_parameters()` gives those in memory: offloaded ones are on the meta device there."""
    for name, tensor in tensors:
        if bad := non_finite_count(tensor):
            return corrupt_tensor_error(name, bad)
    return None


def non_finite_error(tensors: Iterable[tuple[str, Any]], dtype: Any, what: str) -> ModelLoadError:
    """Why `what` (a forward pass's output) came out NaN or inf: the first of `tensors` holding
    one (the checkpoint is corrupt), else the forward pass overflows in `dtype`.

    Called only once a pass has gone wrong: a weight offloaded to disk is read here (to blame it),
    not on every load; one in memory was checked at load (`check_finite_weights`), so this is
    mostly the dtype's overflow."""
    dtype = str(dtype).removeprefix("torch.")
    wider = {"float16": "--dtype bfloat16 or --dtype float32", "bfloat16": "--dtype float32"}.get(dtype)
    advice = (f"its forward pass overflows in {dtype}; run with {wider}" if wider else
              f"the forward pass overflows even in {dtype}; check config.json (norm epsilon, rope scaling) "
              "against the model's")
    return corrupt_tensor(tensors) or ModelLoadError(f"{what} is NaN or infinite though no weight holds one: {advice}")


# ----------------------------------------------------------------------------- cache manifests


def write_manifest(directory: str | Path) -> None:
    """Record in `directory` the size and tensor shapes of each of its safetensors files (call it
    on a freshly written cache entry, before it is moved into place)."""
    directory = Path(directory)
    files = {}
    for path in weight_files(directory):
        tensors, problem = _header(path)
        if problem:
            raise damaged_file_error(path, problem)
        files[path.name] = {"bytes": path.stat().st_size,
                            "tensors": {name: entry["shape"] for name, entry in sorted(tensors.items())}}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def manifest_problem(directory: str | Path) -> str | None:
    """What is wrong with a cache entry, compared with the manifest written with it (an entry
    written before manifests existed: its files' headers against their sizes), or None."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return "config.json is missing"
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        found = damaged_weight_file(directory) if weight_files(directory) else (directory, "no weight files")
        return f"{found[0].name} {found[1]}" if found else None
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is corrupt"
    for file_name, expected in recorded.items():
        path = directory / file_name
        tensors, problem = _header(path)
        if problem:
            return f"{file_name} {problem}"
        if path.stat().st_size != expected["bytes"]:
            return f"{file_name} holds {path.stat().st_size} bytes, {expected['bytes']} were written"
        if {name: entry["shape"] for name, entry in tensors.items()} != expected["tensors"]:
            return f"{file_name} holds other tensors than were written"
    return None
