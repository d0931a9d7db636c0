"""One real quantizer's run on one float model, in the Python that has the quantizer installed.

`sw quantize --quantizer ...` runs this file as a script (`python quantizer_worker.py JOB.json`)
with the interpreter that has llm-compressor, optimum-quanto, bitsandbytes or gguf-py, which need
not be superweight's own: it imports nothing from superweight, only the standard library, torch,
transformers, safetensors and the quantizer. The job (JSON) names the model folder, the quantizer,
the scheme, the modules or tensors to keep in high precision and where to write; the result
(JSON, written to the job's `result` path) holds the size, each super weight's value after
quantization and dequantization, and what the quantizer's own output says it kept.

Besides its own output (a GGUF file, a compressed checkpoint) every Python quantizer writes the
dequantized model as a float32 folder, so that one evaluator scores them all.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _write_float_model(model_dir: Path, tensors: dict, out: Path) -> None:
    """The float checkpoint with `tensors` (name -> dequantized weight) replaced, float32."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    files = sorted(model_dir.glob("*.safetensors"))
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors") and (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    for file in files:
        state = load_file(file)
        for name in state:
            if name in tensors:
                state[name] = tensors[name].to(state[name].dtype).contiguous()
        save_file(state, out / file.name, metadata={"format": "pt"})


def _values(super_weights: list, weight_of) -> dict:
    return {f"{layer},{row},{col}": float(weight_of(layer)[row, col]) for layer, row, col in super_weights}


def _down_proj_after(job: dict, model, dequantized: dict):
    """A layer's down projection after quantization: dequantized, or the kept float one."""
    modules = dict(model.named_modules())

    def weight_of(layer):
        name = job["down_proj"].format(layer)
        return dequantized[f"{name}.weight"] if f"{name}.weight" in dequantized else modules[name].weight.detach()

    return weight_of


def _load(model_dir: Path, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)


# ----------------------------------------------------------------------------- llama.cpp


def _run(cmd: list) -> str:
    out = subprocess.run([str(c) for c in cmd], text=True, capture_output=True)
    if out.returncode != 0:
        text = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}").splitlines()
        raise RuntimeError(f"{Path(str(cmd[1] if cmd[0] == sys.executable else cmd[0])).name}: {text[-1]}")
    return out.stdout


def convert(job: dict) -> dict:
    """The float model as an F32 GGUF, by llama.cpp's own converter."""
    _run([sys.executable, job["converter"], job["model_dir"], "--outtype", "f32", "--outfile", job["out"]])
    return {"gguf": job["out"]}


def llama_cpp(job: dict) -> dict:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cmd = [Path(job["bin_dir"]) / "llama-quantize"]
    if job.get("tensor_types"):
        types_file = Path(job["out"]).with_suffix(".tensor-types.txt")
        types_file.write_text(job["tensor_types"])
        cmd += ["--tensor-type-file", types_file]
    _run(cmd + [job["gguf"], job["out"], job["scheme"]])
    tensors = {t.name: t for t in GGUFReader(job["out"]).tensors}

    def weight_of(layer):
        tensor = tensors[f"blk.{layer}.ffn_down.weight"]
        return dequantize(tensor.data, tensor.tensor_type)

    return {"size_bytes": Path(job["out"]).stat().st_size, "values": _values(job["super_weights"], weight_of),
            "tensor_types": {name: t.tensor_type.name for name, t in tensors.items()}}


# ----------------------------------------------------------------------------- llm-compressor


def llm_compressor(job: dict) -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    bits, group = job["scheme_args"]["bits"], job["scheme_args"]["group"]
    model = _load(Path(job["model_dir"]))
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                               strategy="group" if group else "channel", group_size=group)
    recipe = QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                  ignore=job["keep"])
    oneshot(model=model, recipe=recipe)  # data-free: weight-only, the observers' min-max scales
    dequantized, kept = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            kept.append(name)
            continue
        with torch.no_grad():
            dequantized[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale,
                                                          getattr(module, "weight_zero_point", None),
                                                          args).detach().clone()
    saved = Path(job["out"])
    model.save_pretrained(saved, save_compressed=True)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    _write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = _values(job["super_weights"], _down_proj_after(job, model, dequantized))
    return {"size_bytes": _folder_size(saved), "values": values, "unquantized_linear": kept,
            "saved_ignore": config.get("ignore")}


# ----------------------------------------------------------------------------- optimum-quanto


def quanto(job: dict) -> dict:
    import torch
    from optimum import quanto as oq
    from optimum.quanto.nn import QModuleMixin

    model = _load(Path(job["model_dir"]))
    oq.quantize(model, weights=getattr(oq, job["scheme_args"]["qtype"]), exclude=job["keep"])
    if job["scheme_args"]["per_axis"]:  # quanto's own per-row path (its default is groups of 128)
        for module in model.modules():
            if isinstance(module, QModuleMixin):
                module.weight_group_size = None
    oq.freeze(model)
    dequantized, kept = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin):
            dequantized[f"{name}.weight"] = module.weight.dequantize().float().detach().clone()
        elif isinstance(module, torch.nn.Linear):
            kept.append(name)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "element_size"))
    _write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = _values(job["super_weights"], _down_proj_after(job, model, dequantized))
    return {"size_bytes": size, "values": values, "unquantized_linear": kept}


# ----------------------------------------------------------------------------- bitsandbytes


def bitsandbytes(job: dict) -> dict:
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    kind = job["scheme_args"]["kind"]
    config = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=job["keep"]) if kind == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                                 llm_int8_skip_modules=job["keep"]))
    model = _load(Path(job["model_dir"]), quantization_config=config, device_map="cpu")
    dequantized, kept = {}, []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
        elif isinstance(module, torch.nn.Linear):
            kept.append(name)
            continue
        else:
            continue
        dequantized[f"{name}.weight"] = weight.float().detach().clone()
    _write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = _values(job["super_weights"], _down_proj_after(job, model, dequantized))
    return {"size_bytes": model.get_memory_footprint(), "values": values, "unquantized_linear": kept}


JOBS = {"convert": convert, "llama.cpp": llama_cpp, "llm-compressor": llm_compressor, "quanto": quanto,
        "bitsandbytes": bitsandbytes}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = JOBS[job["job"]](job)
    except Exception as error:  # reported to sw quantize on one line; it raises the project's error
        lines = str(error).strip().splitlines() or [""]
        result = {"error": f"{type(error).__name__}: {' '.join(line.strip() for line in lines)}"[:1500]}
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
