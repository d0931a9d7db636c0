"""Where the weights go: `--dtype`, `--device`, `--device-map` and `--max-memory` as torch and
accelerate take them, checked before anything loads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def torch_dtype(name: str):
    """`--dtype` as from_pretrained takes it ("auto" or a torch dtype); an unknown name fails here."""
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
    try:
        raw = Path(text).read_text(encoding="utf-8") if text.endswith(".json") and Path(text).is_file() else text
        mapping = json.loads(raw)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: the same advice
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


def check_map_devices(device_map: dict) -> None:
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

