"""Loading a causal LM the way `from_pretrained` users expect: hub id, local directory, GGUF file,
or a short alias from configs/models.yaml.

GGUF files are dequantized by transformers, which takes ~20 s even for a 135M model. The first
load therefore writes the dequantized model (safetensors + config + tokenizer) to
`<cache>/gguf/<sha256 of the file>-<dtype>/`; later loads read that directory instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from .. import distributed
from .adapters import adapter_for_config, resolve_adapter
from ..errors import ModelLoadError, OutputPathError, UsageError
from ..files import atomic_directory, refuse_inside

DTYPES = ("auto", "float32", "float16", "bfloat16")
Progress = Callable[[str], None]
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub (or proxy) to take a connection before calling it unreachable


def configs_dir() -> Path:
    """configs/ shipped inside the wheel, else the one at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parents[1] / "configs"


def load_yaml_config(name: str) -> dict[str, Any]:
    with open(configs_dir() / name, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def cache_root(cache_dir: str | None = None) -> Path:
    if os.environ.get("SUPERWEIGHT_CACHE"):
        return Path(os.environ["SUPERWEIGHT_CACHE"]).expanduser()
    if cache_dir:
        return Path(cache_dir).expanduser() / "superweight"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "superweight"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    spec: str  # what the user typed (alias, id, path)
    kind: str  # "hub", "local", "gguf"
    location: str  # hub id, directory, or .gguf file path
    revision: str | None = None
    alias: str | None = None
    known_key: str | None = None  # entry in configs/known_coordinates.yaml, if any
    cache_dir: str | None = None  # --cache-dir, for a hub model

    @property
    def protected_dirs(self) -> list[Path]:
        """Directories that must never be written: the model's own (and the GGUF file's)."""
        from huggingface_hub import constants

        protected = [Path(constants.HF_HUB_CACHE)]
        if self.kind == "hub" and self.cache_dir:  # this model's folder in a --cache-dir hub cache
            protected.append(Path(self.cache_dir).expanduser() / f"models--{self.location.replace('/', '--')}")
        path = Path(self.location)
        if self.kind == "local" or self.alias:  # a model directory, or a package's own files
            protected.append(path if path.is_dir() else path.parent)
        elif self.kind == "gguf":  # a lone .gguf file may sit in any folder: protect the file itself
            protected.append(path)
            if Path(self.spec).expanduser().is_dir():  # ... unless MODEL named its folder: a model directory
                protected.append(Path(self.spec).expanduser())
        return protected


def default_model() -> str:
    return load_yaml_config("models.yaml").get("default", "smollm2-135m")


def aliases() -> dict[str, dict[str, Any]]:
    return load_yaml_config("models.yaml").get("aliases", {})


def _packaged_gguf(alias: str, entry: dict[str, Any]) -> str:
    package = entry["gguf_package"]
    spec = importlib.util.find_spec(package)  # do not import it: the package may need extras
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"alias '{alias}' needs the Python package {package}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf_file"]
    if not path.is_file():
        raise ModelLoadError(f"alias '{alias}': {path} is missing; reinstall {package.replace('_', '-')}")
    return str(path)


def resolve(spec: str | None, revision: str | None = None, gguf_file: str | None = None,
            cache_dir: str | None = None) -> ModelSource:
    """Turn MODEL (alias, .gguf path, directory, hub id) into a `ModelSource`; `cache_dir` is where
    a hub model is cached when not in the default hub cache (kept only to protect it)."""
    return replace(_resolve(spec, revision, gguf_file), cache_dir=cache_dir)


def _resolve(spec: str | None, revision: str | None, gguf_file: str | None) -> ModelSource:
    spec = spec or default_model()
    table = aliases()
    if spec in table:
        entry = table[spec]
        if "gguf_package" in entry:
            return ModelSource(spec, "gguf", _packaged_gguf(spec, entry), alias=spec, known_key=entry.get("known"))
        return ModelSource(
            spec, "hub", entry["hub"], revision=revision or entry.get("revision"), alias=spec,
            known_key=entry.get("known"),
        )
    path = Path(spec).expanduser()
    if gguf_file:
        path = path / gguf_file
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}; check MODEL and --gguf-file")
        return ModelSource(spec, "gguf", str(path))
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}; check the path")
        return ModelSource(spec, "gguf", str(path))
    if path.is_dir():
        return _directory_source(spec, path)
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and path.parent.exists() and spec.count("/") > 1
    if looks_like_path or path.suffix in (".safetensors", ".bin", ".pt"):
        raise ModelLoadError(f"model path not found: {spec}; give a model directory, a .gguf file, a hub id or an alias")
    return ModelSource(spec, "hub", spec, revision=revision)


def _directory_source(spec: str, path: Path) -> ModelSource:
    """A model directory; one without config.json but with a single .gguf file is that file."""
    if (path / "config.json").is_file():
        return ModelSource(spec, "local", str(path))
    ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return ModelSource(spec, "gguf", str(path / ggufs[0]))
    if ggufs:
        raise UsageError(f"{spec} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                         f"choose one with --gguf-file NAME")
    raise ModelLoadError(f"{spec} holds no config.json and no .gguf file; give a model directory (config.json "
                         "and weights), a .gguf file, a hub id or an alias")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    dtype: str
    load_seconds: float
    from_cache: bool = False
    notes: list[str] = field(default_factory=list)


def model_fingerprint(loaded: LoadedModel) -> str:
    """Names the weights that were evaluated, for result caches: their source, version and dtype,
    and for files on disk their names, sizes and modification times (a rewrite is a new model)."""
    where = Path(getattr(loaded.model, "name_or_path", "") or loaded.source.location)
    weight_files = sorted(p for p in where.glob("*") if p.suffix in (".safetensors", ".bin")) if where.is_dir() else []
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files]
    return json.dumps([loaded.source.location, loaded.source.revision,
                       getattr(loaded.model.config, "_commit_hash", None), loaded.dtype, str(where), stamps])


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UsageError(f"unknown --dtype '{name}'; use one of {', '.join(DTYPES)}")
    return "auto" if name == "auto" else getattr(torch, name)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps asked for, but MPS is not available here; use --device cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise UsageError(f"unknown --device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    return device


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None) -> str | dict | None:
    """`--device-map`: an accelerate strategy, or a JSON object / .json file mapping modules to devices."""
    if text is None:
        return None
    if text in DEVICE_MAP_STRATEGIES:
        return text
    raw = Path(text).read_text(encoding="utf-8") if text.endswith(".json") and Path(text).is_file() else text
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(
            f"bad --device-map '{text}': use {', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON object such as "
            "'{\"model.embed_tokens\": 0, \"model.layers\": 0, \"lm_head\": \"cpu\"}' (or a .json file with one)"
        )
    for module, device in mapping.items():
        if _map_gpu(device) is None and device not in ("cpu", "disk", "mps"):
            raise UsageError(
                f"bad --device-map device {json.dumps(device)} for '{module}': use a GPU index (0, 1, ...), "
                "cuda:N, mps, cpu or disk"
            )
    return mapping


def _map_gpu(device: Any) -> int | None:
    """The CUDA index a device-map value names (0, "cuda", "cuda:1"), else None."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device) if isinstance(device, str) else None
    return int(match.group(1) or 0) if match else None


def _check_map_devices(device_map: dict) -> None:
    """Fail before loading when a device map names a GPU this machine lacks."""
    import torch

    for module, device in device_map.items():
        gpu = _map_gpu(device)
        if gpu is not None and gpu >= torch.cuda.device_count():
            raise UsageError(
                f"--device-map puts '{module}' on CUDA device {gpu}, but this machine has "
                f"{torch.cuda.device_count()}; use existing devices, cpu or disk"
            )
        if device == "mps":
            resolve_device("mps")


def parse_max_memory(text: str | None) -> dict | None:
    """`--max-memory 0=20GiB,1=20GiB,cpu=64GiB` -> accelerate's max_memory dict."""
    if not text:
        return None
    budget: dict[int | str, str] = {}
    for part in text.split(","):
        device, _, amount = part.strip().partition("=")
        device, amount = device.strip(), amount.strip()
        valid_device = device.isdigit() or device in ("cpu", "disk", "mps")
        valid_amount = bool(re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", amount, re.IGNORECASE))
        if not (valid_device and valid_amount):
            raise UsageError(
                f"bad --max-memory entry '{part.strip()}': write DEVICE=AMOUNT pairs separated by commas, "
                "e.g. 0=20GiB,1=20GiB,cpu=64GiB"
            )
        budget[int(device) if device.isdigit() else device] = amount.replace(" ", "")
    return budget


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_gguf(path: str) -> str:
    """Read the GGUF header; return its architecture. Corrupt or truncated files fail here, fast."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        field_ = reader.fields.get("general.architecture")
        architecture = bytes(field_.parts[field_.data[0]]).decode() if field_ else "unknown"
        # Touch the last tensor so a truncated file is caught before the slow dequantisation.
        if reader.tensors:
            _ = reader.tensors[-1].data.reshape(-1)[-1:]
        return architecture
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors... on bad input
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (corrupt or truncated: {type(e).__name__}); download it again"
        ) from None


def weightless_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The model `config` describes, on the meta device: every module and shape, and no weight
    read or allocated (what checks of names and coordinates need before, or instead of, a load)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def gguf_dense_shape(path: str) -> tuple[int, int, int] | None:
    """(decoder layers, hidden size, intermediate size) from a GGUF's header, read without
    dequantising anything; None for a mixture-of-experts model or a header that lacks them."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields

        def number(key: str) -> int | None:
            field_ = fields.get(key)
            return int(field_.parts[field_.data[0]][0]) if field_ else None

        architecture = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
        if number(f"{architecture}.expert_count"):
            return None
        shape = tuple(number(f"{architecture}.{key}")
                      for key in ("block_count", "embedding_length", "feed_forward_length"))
        return None if None in shape else shape  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - an unreadable header is the load's to report
        return None


def _check_config(config) -> None:
    """Refuse, before any weight loads, a config superweight cannot work with (a model type the
    adapter table lacks is looked at on a weightless model: see arch.adapter_for_config)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"model type '{config.model_type}' is not a causal language model; superweight needs a decoder LM "
            "(AutoModelForCausalLM)"
        )
    adapter_for_config(config)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub endpoint (or the proxy in front of it) takes a TCP connection within `timeout`
    seconds; the name lookup runs in a thread, as it can hang far longer than that without a network."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = getproxies().get(endpoint.scheme)
    if proxy and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or 80
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except (OSError, ValueError):
            answer.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answer and answer[0])


def _hub_access(source: ModelSource, cache_dir: str | None, notice: Progress) -> dict[str, Any]:
    """Extra from_pretrained options for a hub model when the hub cannot be reached and
    HF_HUB_OFFLINE is not set: huggingface_hub would retry for ~30 s before using the cache or failing.
    A cached copy is then read without asking the hub; without one, fail now. A local directory
    needs no hub."""
    if source.kind != "hub" or _hub_offline() or _hub_reachable():
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source.location, "config.json", cache_dir=cache_dir,
                                         revision=source.revision), str):
        notice(f"{constants.ENDPOINT} is not reachable: using the cached copy of {source.location}")
        return {"local_files_only": True}
    alias = f" (alias '{source.alias}')" if source.alias else ""
    raise ModelLoadError(
        f"cannot reach {constants.ENDPOINT} to download {source.location}{alias}, and it is not in the local "
        "cache; connect to the network, or set HF_HUB_OFFLINE=1 to use cached models only, or give a local "
        "directory or .gguf file"
    )


def _from_pretrained_errors(source: ModelSource, error: Exception) -> ModelLoadError:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if source.kind == "hub":
        offline = _hub_offline()
        hint = " (offline: HF_HUB_OFFLINE is set)" if offline else ""
        if source.alias and offline:
            return ModelLoadError(
                f"alias '{source.alias}' maps to the hub model {source.location}, which is not in the local cache{hint}; "
                "unset HF_HUB_OFFLINE to download it, or give a local directory or .gguf file"
            )
        if source.alias:
            return ModelLoadError(
                f"alias '{source.alias}' maps to the hub model {source.location}, which is not in the local cache and "
                f"could not be downloaded ({text}); check your access to it, or give a local directory or .gguf file"
            )
        known = ", ".join(sorted(aliases()))
        return ModelLoadError(
            f"cannot load '{source.spec}'{hint}: not a known alias ({known}), a local directory, a .gguf file, "
            f"or a hub model in the cache; check the name or go online"
        )
    return ModelLoadError(f"cannot load {source.location}: {text}")


def _load_gguf_into_cache(source: ModelSource, dtype: str, cache_dir: str | None, progress: Progress,
                          notice: Progress) -> tuple[Path, bool]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = "float32" if dtype == "auto" else dtype  # GGUF holds quantised blocks: dequantise to fp32
    progress("hashing GGUF file")
    digest = file_sha256(source.location)
    target = cache_root(cache_dir) / "gguf" / f"{digest[:32]}-{dtype_name}"
    if (target / "config.json").is_file():
        return target, True
    architecture = _check_gguf(source.location)
    # Absolute: a bare relative name's folder is '', which from_pretrained takes for a hub id.
    directory, name = os.path.split(os.path.abspath(source.location))
    notice(f"first load of {name}: dequantizing ({architecture}) and caching it, once; later loads read the cache")
    progress(f"dequantizing GGUF ({architecture})")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=getattr(torch, dtype_name))
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ValueError as e:
        raise ModelLoadError(
            f"transformers cannot read the '{architecture}' architecture of {source.location}: "
            f"{str(e).splitlines()[0]}; convert the model to safetensors"
        ) from None
    _check_config(model.config)
    # The loaded weights are plain dequantised floats, but the model still carries the gguf
    # quantizer, which makes save_pretrained refuse; drop it and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target, False


def _fresh_offload_folder(cache_dir: str | None, source: ModelSource) -> Path:
    """A new folder of this load's own for accelerate's disk offload: never shared with another
    process or load (accelerate writes an index.json there), never inside the model's directory."""
    parent = cache_root(cache_dir) / "offload"
    try:
        refuse_inside(parent, source.protected_dirs)
    except OutputPathError:
        raise OutputPathError(
            f"the disk-offload folder {parent} would be inside the model's directory or the hub cache; "
            "point SUPERWEIGHT_CACHE (or --cache-dir) elsewhere"
        ) from None
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))


def load_model(
    spec: str | None = None,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
    progress: Progress | None = None,
    notice: Progress | None = None,
) -> LoadedModel:
    """Load MODEL and its tokenizer, ready for inference (eval mode, no grad needed).

    `progress` gets short status texts as the load goes; `notice` the few messages worth keeping
    on screen (a first, slow GGUF load; a cached copy used because the hub cannot be reached).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    progress = progress or (lambda message: None)
    notice = notice or (lambda message: None)
    torch_dtype = _torch_dtype(dtype)
    target_device = None if device_map else resolve_device(distributed.rank_device(device))  # bad --device: now
    source = resolve(spec, revision=revision, gguf_file=gguf_file, cache_dir=cache_dir)
    started = time.perf_counter()
    from_cache = False
    location, hub_kwargs = source.location, {}
    if source.kind == "gguf":
        # Under a launcher rank 0 dequantizes and writes the cache first; the others then read it.
        cached, from_cache = distributed.in_turns(
            lambda: _load_gguf_into_cache(source, dtype, cache_dir, progress, notice))
        location = str(cached)
        torch_dtype = _torch_dtype("float32" if dtype == "auto" else dtype)
    else:
        hub_kwargs = dict(revision=source.revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                          **_hub_access(source, cache_dir, notice))
        progress(f"reading config of {source.spec}")
        try:
            config = AutoConfig.from_pretrained(location, **hub_kwargs)
        except (OSError, ValueError) as e:
            raise _from_pretrained_errors(source, e) from None
        _check_config(config)
    placement: dict[str, Any] = {}
    if max_memory and not device_map:
        device_map = "auto"  # a memory budget only means something to accelerate's placement
    offload_folder = None
    if isinstance(device_map, dict):
        _check_map_devices(device_map)
    if isinstance(device_map, str):  # under a launcher, each rank spreads its copy over its own GPUs
        max_memory = distributed.rank_max_memory(max_memory)
    if device_map:
        placement["device_map"] = device_map
        if max_memory:
            placement["max_memory"] = max_memory
        # Any placement may send weights to "disk" ("auto" too, when they do not fit).
        offload_folder = _fresh_offload_folder(cache_dir, source)
        placement["offload_folder"] = str(offload_folder)
    progress(f"loading weights of {source.spec}")
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **hub_kwargs, **placement)
        tokenizer = AutoTokenizer.from_pretrained(location, **hub_kwargs)
    except BaseException as e:
        if offload_folder is not None:
            shutil.rmtree(offload_folder, ignore_errors=True)  # a failed load leaves nothing behind
        if isinstance(e, (OSError, ValueError)):
            raise _from_pretrained_errors(source, e) from None
        raise
    if offload_folder is not None:
        if any(offload_folder.iterdir()):
            # Offloaded weights are read from there at every forward pass: it lives as long as the
            # model (finalize also runs at interpreter exit).
            weakref.finalize(model, shutil.rmtree, offload_folder, ignore_errors=True)
        else:
            offload_folder.rmdir()  # nothing written (a safetensors checkpoint is read in place)
    if not device_map:
        model.to(target_device)
    model.eval()
    _, note = resolve_adapter(model)  # a model type the table lacks: which row's layout it follows
    return LoadedModel(
        model=model, tokenizer=tokenizer, source=source, dtype=str(model.dtype).removeprefix("torch."),
        load_seconds=time.perf_counter() - started, from_cache=from_cache, notes=[note] if note else [],
    )
