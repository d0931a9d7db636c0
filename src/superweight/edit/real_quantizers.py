"""Real quantizers (llama.cpp, llm-compressor, optimum-quanto, bitsandbytes) run on a float model,
naive and with `sw export`'s names kept in high precision.

None of them is a dependency of superweight. llama.cpp is its own binaries (`llama-quantize`,
`llama-perplexity`) and converter (`convert_hf_to_gguf.py`); the others are Python packages, run
by `quantizer_worker.py` in whichever Python has them (it may be another venv than superweight's).
Where they are:

* `SUPERWEIGHT_LLAMA_CPP=DIR` (or `--quantizer-path DIR` with `--quantizer llama.cpp`): the folder
  holding `llama-quantize` and `llama-perplexity`; `SUPERWEIGHT_LLAMA_CPP_CONVERT=FILE` the
  converter (default: `DIR/convert_hf_to_gguf.py`), run by the quantizers' Python (needs `gguf`).
* `SUPERWEIGHT_QUANTIZER_PYTHON=PYTHON` (or `--quantizer-path` with a Python quantizer: a Python
  executable or a venv folder): the Python that has the quantizer (default: this one).

`scripts/quantizers/setup.sh` builds llama.cpp and a venv with all of them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import MissingDependencyError, SuperweightError, UsageError

QUANTIZERS = ("rtn", "llama.cpp", "llm-compressor", "quanto", "bitsandbytes")
DEFAULT_SCHEMES = {"llama.cpp": "Q4_K_M", "llm-compressor": "W4A16", "quanto": "qint4", "bitsandbytes": "nf4"}
# llama-quantize's file types that need no importance matrix.
LLAMA_CPP_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
                   "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
SCHEME_HELP = {
    "llama.cpp": ", ".join(LLAMA_CPP_TYPES),
    "llm-compressor": "W8A16, W4A16, W3A16, W2A16 (per channel) or with -gN for groups of N (W4A16-g64)",
    "quanto": "qint8 (per channel), qint4, qint2 (groups of 128) or qint4-axis, qint2-axis (per channel)",
    "bitsandbytes": "nf4, fp4, int8 (LLM.int8)",
}
INSTALL = {
    "llama.cpp": "build llama.cpp (bash scripts/quantizers/setup.sh builds it from the llama-cpp-python sdist) "
                 "and set SUPERWEIGHT_LLAMA_CPP=DIR (the folder with llama-quantize and llama-perplexity) "
                 "or pass --quantizer-path DIR",
    "llm-compressor": "pip install llmcompressor",
    "quanto": "pip install optimum-quanto",
    "bitsandbytes": "pip install bitsandbytes",
}
_PACKAGES = {"llm-compressor": "llmcompressor", "quanto": "optimum.quanto", "bitsandbytes": "bitsandbytes",
             "llama.cpp": "gguf"}
WORKER = Path(__file__).with_name("quantizer_worker.py")


class QuantizerError(SuperweightError):
    """The quantizer ran and refused the model (or failed); the message is its own, on one line."""


def parse_scheme(quantizer: str, scheme: Optional[str]) -> dict[str, Any]:
    """The quantizer's settings for `scheme` (default: its 4-bit one); an unknown one is refused."""
    if quantizer not in DEFAULT_SCHEMES:
        raise UsageError(f"--quantizer must be one of {', '.join(QUANTIZERS)}, got '{quantizer}'")
    scheme = scheme or DEFAULT_SCHEMES[quantizer]
    parsed: Optional[dict[str, Any]] = None
    if quantizer == "llama.cpp" and scheme.upper() in LLAMA_CPP_TYPES:
        parsed = {"type": scheme.upper()}
    elif quantizer == "llm-compressor":
        match = re.fullmatch(r"W([2348])A16(?:-g(\d+))?", scheme, flags=re.IGNORECASE)
        if match and (match.group(2) is None or int(match.group(2)) > 0):
            parsed = {"bits": int(match.group(1)), "group": int(match.group(2)) if match.group(2) else None}
    elif quantizer == "quanto":
        match = re.fullmatch(r"qint([248])(-axis)?", scheme, flags=re.IGNORECASE)
        if match:
            parsed = {"qtype": f"qint{match.group(1)}", "per_axis": bool(match.group(2)) or match.group(1) == "8"}
    elif quantizer == "bitsandbytes" and scheme.lower() in ("nf4", "fp4", "int8"):
        parsed = {"kind": scheme.lower()}
    if parsed is None:
        raise UsageError(f"{quantizer} has no scheme '{scheme}'; choose one of: {SCHEME_HELP[quantizer]}")
    return {"name": scheme, **parsed}


@dataclass(frozen=True)
class QuantizerTools:
    """Where one quantizer's programs are."""

    quantizer: str
    python: str  # runs quantizer_worker.py (and llama.cpp's converter)
    bin_dir: Optional[Path] = None  # llama.cpp: llama-quantize, llama-perplexity
    converter: Optional[Path] = None  # llama.cpp: convert_hf_to_gguf.py


def _python(path: Optional[str]) -> str:
    if not path:
        return sys.executable
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    return str(candidate)


def find_tools(quantizer: str, quantizer_path: Optional[str] = None) -> QuantizerTools:
    """The quantizer's programs, checked: one that is missing is refused with how to install it."""
    if quantizer == "llama.cpp":
        bin_dir = quantizer_path or os.environ.get("SUPERWEIGHT_LLAMA_CPP")
        if not bin_dir:
            raise MissingDependencyError(f"llama.cpp is not set up: {INSTALL['llama.cpp']}")
        bin_dir = Path(bin_dir).expanduser()
        for program in ("llama-quantize", "llama-perplexity"):
            if not (bin_dir / program).is_file():
                raise MissingDependencyError(f"{bin_dir} has no {program}: {INSTALL['llama.cpp']}")
        converter = Path(os.environ.get("SUPERWEIGHT_LLAMA_CPP_CONVERT") or bin_dir / "convert_hf_to_gguf.py")
        if not converter.is_file():
            raise MissingDependencyError(f"llama.cpp's converter {converter} is missing: set "
                                         "SUPERWEIGHT_LLAMA_CPP_CONVERT to convert_hf_to_gguf.py from llama.cpp's source")
        tools = QuantizerTools(quantizer, _python(os.environ.get("SUPERWEIGHT_QUANTIZER_PYTHON")), bin_dir, converter)
    else:
        tools = QuantizerTools(quantizer, _python(quantizer_path or os.environ.get("SUPERWEIGHT_QUANTIZER_PYTHON")))
    _check_package(tools)
    return tools


def _check_package(tools: QuantizerTools) -> None:
    package = _PACKAGES[tools.quantizer]
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({package.split('.')[0]!r}) and importlib.util.find_spec({package!r}) else 1)"
    try:
        found = subprocess.run([tools.python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        found = False
    if not found:
        how = INSTALL[tools.quantizer] if tools.quantizer != "llama.cpp" else "pip install gguf"
        raise MissingDependencyError(f"{tools.quantizer} needs the Python package {package}, which {tools.python} "
                                     f"does not have: {how} (or point SUPERWEIGHT_QUANTIZER_PYTHON / "
                                     "--quantizer-path at a Python that has it)")


def check_model_fits(quantizer: str, settings: dict, model_dir: Path, keep: list[str]) -> None:
    """Refuse, before any work, a model the quantizer cannot take: llm-compressor's groups must
    divide every quantized matrix's columns."""
    group = settings.get("group")
    if quantizer != "llm-compressor" or not group:
        return
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                module = name.removesuffix(".weight")
                if (len(shape) == 2 and name.endswith(".weight") and "embed" not in name and module not in keep
                        and shape[1] % group):
                    raise QuantizerError(
                        f"llm-compressor cannot quantize {module} in groups of {group}: its {shape[1]} columns are "
                        f"not a multiple of {group}; choose a group size that divides them (e.g. "
                        f"{settings['name'].split('-')[0]}-g{_divisor(shape[1], group)}) or the per-channel scheme")


def _divisor(columns: int, below: int) -> int:
    return next(size for size in (128, 64, 32, 16, 8) if size < below and columns % size == 0) if below > 8 else 1


def run_worker(tools: QuantizerTools, job: dict[str, Any]) -> dict[str, Any]:
    """One job of quantizer_worker.py in the quantizer's Python; its error becomes QuantizerError."""
    with tempfile.TemporaryDirectory(prefix="sw-quantizer-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps({**job, "result": str(result_file)}))
        process = subprocess.run([tools.python, str(WORKER), str(job_file)], capture_output=True, text=True)
        if not result_file.is_file():
            lines = (process.stderr.strip() or f"exit status {process.returncode}").splitlines()
            raise QuantizerError(f"{tools.quantizer} failed: {lines[-1]}")
        result = json.loads(result_file.read_text())
    if "error" in result:
        raise QuantizerError(f"{tools.quantizer} cannot quantize this model: {result['error']}")
    return result


def llama_perplexity(tools: QuantizerTools, gguf: Path, text_file: Path, context: int, threads: int = 2) -> dict:
    """llama.cpp's own perplexity of `text_file` (the second half of each `context`-token chunk)."""
    # --no-repack: the AMX buffer type of a native CPU build segfaults on some CPUs; plain kernels do not.
    out = subprocess.run([str(tools.bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c",
                          str(context), "-b", str(context), "-t", str(threads), "--no-repack"],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if out.returncode != 0 or not match:
        lines = text.strip().splitlines() or [f"exit status {out.returncode}"]
        raise QuantizerError(f"llama-perplexity failed: {lines[-1]}")
    return {"perplexity": float(match.group(1)), "stderr": float(match.group(2))}


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
