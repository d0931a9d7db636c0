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

The steps each job is made of (quantize, dequantize, read back) are public functions, which
scripts/quantizers/measure_smollm2.py calls too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def write_float_model(model_dir: Path, tensors: dict, out: Path) -> None:
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


def super_weight_values(super_weights: list, weight_of) -> dict:
    """Each super weight's value ("layer,row,col" -> float) in the down projections `weight_of(layer)`."""
    return {f"{layer},{row},{col}": float(weight_of(layer)[row, col]) for layer, row, col in super_weights}


def down_proj_after(down_proj: str, model, dequantized: dict):
    """A layer's down projection (`down_proj`: its module name, with {} for the layer) after
    quantization: dequantized, or the kept float one."""
    modules = dict(model.named_modules())

    def weight_of(layer):
        name = down_proj.format(layer)
        return dequantized[f"{name}.weight"] if f"{name}.weight" in dequantized else modules[name].weight.detach()

    return weight_of


def load_float32(model_dir: Path, **kwargs):
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
    cmd = [Path(job["bin_dir"]) / "llama-quantize"]
    if job.get("tensor_types"):
        types_file = Path(job["out"]).with_suffix(".tensor-types.txt")
        types_file.write_text(job["tensor_types"])
        cmd += ["--tensor-type-file", types_file]
    _run(cmd + [job["gguf"], job["out"], job["scheme"]])
    values, tensor_types = gguf_read_back(Path(job["out"]), job["super_weights"])
    return {"size_bytes": Path(job["out"]).stat().st_size, "values": values, "tensor_types": tensor_types}


def gguf_read_back(path: Path, super_weights: list) -> tuple[dict, dict]:
    """A GGUF's super weights' values (dequantized) and each tensor's type (name -> F16, Q4_K, ...)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}

    def weight_of(layer):
        tensor = tensors[f"blk.{layer}.ffn_down.weight"]
        return dequantize(tensor.data, tensor.tensor_type)  # numpy (rows, cols) = (hidden, intermediate)

    return super_weight_values(super_weights, weight_of), {name: t.tensor_type.name for name, t in tensors.items()}


# ----------------------------------------------------------------------------- llm-compressor


def llm_compressor(job: dict) -> dict:
    from llmcompressor import oneshot

    model = load_float32(Path(job["model_dir"]))
    oneshot(model=model, recipe=llm_compressor_recipe(job["scheme_args"]["bits"], job["scheme_args"]["group"],
                                                      job["keep"]))
    dequantized, kept = llm_compressor_dequantized(model)
    saved = Path(job["out"])
    model.save_pretrained(saved, save_compressed=True)
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = super_weight_values(job["super_weights"], down_proj_after(job["down_proj"], model, dequantized))
    return {"size_bytes": folder_size(saved), "values": values, "unquantized_linear": kept,
            "saved_ignore": config.get("ignore")}


def llm_compressor_recipe(bits: int, group: int | None, ignore: list):
    """Symmetric int weights, in groups of `group` columns (None: one scale per output channel),
    activations left alone; the modules in `ignore` stay in float. `oneshot` runs it data-free:
    weight-only, the observers' min-max scales."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                               strategy="group" if group else "channel", group_size=group)
    return QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=ignore)


def llm_compressor_dequantized(model) -> tuple[dict, list]:
    """After `oneshot`: each quantized Linear's weight as it computes with it ("name.weight" ->
    tensor), and the names of the Linear modules left in float."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

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
    return dequantized, kept


# ----------------------------------------------------------------------------- optimum-quanto


def quanto(job: dict) -> dict:
    model = load_float32(Path(job["model_dir"]))
    quanto_quantize(model, job["scheme_args"]["qtype"], job["scheme_args"]["per_axis"], job["keep"])
    dequantized, kept = quanto_dequantized(model)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values() if hasattr(t, "element_size"))
    write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = super_weight_values(job["super_weights"], down_proj_after(job["down_proj"], model, dequantized))
    return {"size_bytes": size, "values": values, "unquantized_linear": kept}


def quanto_quantize(model, qtype: str, per_axis: bool, exclude: list) -> None:
    """Quantize `model`'s weights to quanto's `qtype` (qint8, qint4, ...) and freeze them; the
    modules in `exclude` stay in float."""
    from optimum import quanto as oq
    from optimum.quanto.nn import QModuleMixin

    oq.quantize(model, weights=getattr(oq, qtype), exclude=exclude)
    if per_axis:  # quanto's own per-row path (its default is groups of 128)
        for module in model.modules():
            if isinstance(module, QModuleMixin):
                module.weight_group_size = None
    oq.freeze(model)


def quanto_dequantized(model) -> tuple[dict, list]:
    """Each quantized module's weight dequantized ("name.weight" -> float tensor), and the names
    of the Linear modules left in float."""
    import torch
    from optimum.quanto.nn import QModuleMixin

    dequantized, kept = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin):
            dequantized[f"{name}.weight"] = module.weight.dequantize().float().detach().clone()
        elif isinstance(module, torch.nn.Linear):
            kept.append(name)
    return dequantized, kept


# ----------------------------------------------------------------------------- bitsandbytes


def bitsandbytes(job: dict) -> dict:
    config = bitsandbytes_config(job["scheme_args"]["kind"], job["keep"])
    model = load_float32(Path(job["model_dir"]), quantization_config=config, device_map="cpu")
    dequantized, kept = bitsandbytes_dequantized(model)
    write_float_model(Path(job["model_dir"]), dequantized, Path(job["float_out"]))
    values = super_weight_values(job["super_weights"], down_proj_after(job["down_proj"], model, dequantized))
    return {"size_bytes": model.get_memory_footprint(), "values": values, "unquantized_linear": kept}


def bitsandbytes_config(kind: str, skip: list):
    """int8 (LLM.int8) or 4-bit of `kind` (nf4, fp4) computing in float32; the modules in `skip`
    stay in float."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=skip)


def bitsandbytes_dequantized(model) -> tuple[dict, list]:
    """Each quantized Linear's weight dequantized ("name.weight" -> float tensor), and the names of
    the Linear modules left in float."""
    import bitsandbytes as bnb
    import torch

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
    return dequantized, kept


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
