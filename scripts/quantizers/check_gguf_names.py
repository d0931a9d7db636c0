"""Check `sw export --to llama.cpp` against llama.cpp's own converter, family by family.

For every row of the adapter table (and Gemma 3's multimodal checkpoint, which follows Gemma 4's
row), a tiny random checkpoint is written as transformers saves it (per-expert tensors, as published
checkpoints have them; config keys that published checkpoints carry and transformers 5 no longer
writes are added), and for the multimodal families also in the published multimodal layout (the
composite config, text tensors under `model.language_model.`). llama.cpp's converter (its
`conversion` package, from the llama.cpp tree that scripts/quantizers/setup.sh unpacks) turns each
into a GGUF, in a child process that imports llama.cpp's own gguf-py. Then, per checkpoint: the GGUF
architecture beside `gguf_architecture`, and the tensor `export` names for every down-projection
matrix (each layer's dense MLP, routed experts, shared expert): from gguf-py's table alone, and
checked by `export(..., gguf=)` against the GGUF's names and shapes; both must agree. A family the converter does
not take must be one `export` refuses. Prints one line per checkpoint; exits 1 on any mismatch.

Two steps of the converter are skipped, neither of which touches a tensor name: the vocabulary
(`set_vocab`: the tiny models have no tokenizer; a stub tokenizer.json gives Gemma's embedding
trim its size) and transformers' AutoConfig (config.json is read as written, the converter's own
fallback: transformers 5 renames keys, e.g. rotary_pct, that the converter reads).

Usage: .venv/bin/python scripts/quantizers/check_gguf_names.py [--llama-cpp DIR] [FAMILY ...]
(DIR defaults to .cache/quantizers/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp, 0.3.36)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Config keys as the published checkpoints have them (None: remove the key transformers wrote).
PUBLISHED_CONFIG = {
    "gpt2": {"n_ctx": 64},
    "gpt_neox": {"rotary_pct": 0.25},
    "cohere2": {"rotary_pct": 1.0},
    "falcon": {"num_kv_heads": None},  # Falcon-7B: multi_query, no num_kv_heads
    "phimoe": {"architectures": ["PhiMoEForCausalLM"], "original_max_position_embeddings": 64},  # Phi-3.5-MoE
    **{t: {"mtp_num_hidden_layers": 1} for t in ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")},
}
TINY_OVERRIDES = {
    "cohere2": {"tie_word_embeddings": True},  # Command R7B ties its output head
    "deepseek_v3": {"num_key_value_heads": 4},  # MLA: as many key/value heads as heads
}
# Published multimodal checkpoints: (model_type, architecture); text tensors under model.language_model.
# (Gemma 3's and 4's tiny models are multimodal already, saved in that layout.)
MULTIMODAL = {
    "qwen3_5": ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"),
    "llama4": ("llama4", "Llama4ForConditionalGeneration"),
}


def convert(llama_cpp: Path, model_dir: Path, out: Path) -> None:
    """Child process: llama.cpp's converter on `model_dir`, with llama.cpp's own gguf-py."""
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(llama_cpp)]
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    ModelBase.load_hparams = staticmethod(lambda d, is_mistral_format=False: json.loads((Path(d) / "config.json").read_text()))
    hparams = ModelBase.load_hparams(model_dir)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    try:
        model_class = get_model_class(architecture)
    except NotImplementedError:
        print(json.dumps({"architecture": architecture, "converter": None}))
        return
    model_class.set_vocab = lambda self: None
    model_class(model_dir, gguf.LlamaFileType.ALL_F32, out).write()
    print(json.dumps({"architecture": architecture, "converter": model_class.__name__}))


def checkpoints(family: str, root: Path):
    """(label, directory, model) of each checkpoint of `family` to convert."""
    from synthetic import tiny_model

    model = tiny_model(family, **TINY_OVERRIDES.get(family, {}))
    text = root / family
    model.save_pretrained(text, safe_serialization=True)
    config = json.loads((text / "config.json").read_text())
    for key, value in PUBLISHED_CONFIG.get(family, {}).items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (text / "config.json").write_text(json.dumps(config))
    vocabulary = {f"t{i}": i for i in range(model.get_input_embeddings().weight.shape[0])}
    (text / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocabulary}, "added_tokens": []}))
    yield family, text, model
    if family in MULTIMODAL:
        from safetensors.torch import load_file, save_file

        model_type, architecture = MULTIMODAL[family]
        wrapped = root / f"{family}-multimodal"
        wrapped.mkdir()
        text_config = {k: v for k, v in config.items() if k != "architectures"}
        (wrapped / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type,
                                                         "text_config": text_config}))
        (wrapped / "tokenizer.json").write_text((text / "tokenizer.json").read_text())
        tensors = load_file(text / "model.safetensors")
        save_file({"model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k: v
                   for k, v in tensors.items()}, wrapped / "model.safetensors")
        yield f"{model_type} ({architecture})", wrapped, model


def every_matrix(model) -> list:
    """One coordinate in every down-projection matrix of the model: each layer's dense MLP, its routed
    experts (one fused tensor) and its shared expert."""
    from superweight.coords import SuperWeight
    from superweight.model.adapters import decoder_layers, layer_experts

    return [SuperWeight(layer, 0, 0, expert=expert) for layer in range(len(decoder_layers(model)))
            for expert in dict.fromkeys(e if isinstance(e, str) or e is None else 0 for e in layer_experts(model, layer))]


def check(family: str, llama_cpp: Path, root: Path) -> list[tuple[str, bool]]:
    """Per checkpoint of `family`: (what was found, whether export agrees with the converter)."""
    from gguf import GGUFReader

    from superweight.edit.export import export, gguf_tensor_names
    from superweight.errors import SuperweightError
    from superweight.model.adapters import gguf_architecture

    lines = []
    for label, directory, model in checkpoints(family, root):
        mine = gguf_architecture(model.config.model_type)
        weights = every_matrix(model)
        try:  # without a GGUF: gguf-py's table under the architecture export expects
            names = gguf_tensor_names(model, weights, mine)
        except SuperweightError as e:
            names = [f"refused: {e}"]
        except Exception as e:  # a crash is a mismatch, reported as such
            names = [f"crashed: {type(e).__name__}: {e}"]
        out = directory / "model.gguf"
        child = subprocess.run([sys.executable, __file__, "--convert", str(directory), str(out),
                                "--llama-cpp", str(llama_cpp)], capture_output=True, text=True)
        if child.returncode != 0:
            lines.append((f"{label}: the converter failed: {child.stderr.strip().splitlines()[-1]}", False))
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if result["converter"] is None:
            ok = names[0].startswith("refused")
            lines.append((f"{label}: llama.cpp does not convert {result['architecture']}; export "
                          + ("refuses it" if ok else f"names {names[0]}"), ok))
            continue
        reader = GGUFReader(str(out))
        field = reader.fields["general.architecture"]
        theirs = bytes(field.parts[field.data[0]]).decode()
        tensors = {t.name for t in reader.tensors}
        try:  # with the GGUF: export checks each name and its shape against the file
            checked = export(weights, "llama.cpp", spec=str(directory), gguf=out).gguf_tensors
        except Exception as e:
            checked = [f"{type(e).__name__}: {e}"]
        ok = theirs == mine and checked == names and set(names) <= tensors
        kinds = sorted({name.split(".")[2] for name in names if name.startswith("blk.")})
        lines.append((f"{label}: {result['architecture']} -> {result['converter']}, GGUF '{theirs}' (export: "
                      f"'{mine}'); {len(names)} matrices ({', '.join(kinds)}), e.g. {names[-1]}"
                      + ("" if ok else f"; missing from the GGUF or refused: {sorted(set(names + checked) - tensors)}"),
                      ok))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    version = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
    parser.add_argument("--llama-cpp", type=Path,
                        default=ROOT / ".cache/quantizers" / f"llama_cpp_python-{version}/vendor/llama.cpp")
    parser.add_argument("--convert", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("families", nargs="*")
    args = parser.parse_args()
    if args.convert:
        convert(args.llama_cpp, *args.convert)
        return 0
    if not (args.llama_cpp / "conversion").is_dir():
        print(f"no llama.cpp converter in {args.llama_cpp}; run bash scripts/quantizers/setup.sh llama "
              "or give --llama-cpp", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    from superweight.model.adapters import ADAPTERS

    commit = subprocess.run(["git", "-C", str(args.llama_cpp), "log", "-1", "--format=%H %cs"],
                            capture_output=True, text=True).stdout.strip() or "unknown commit"
    print(f"llama.cpp {commit} ({args.llama_cpp})")
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        for family in args.families or [*ADAPTERS, "gemma3"]:
            for line, ok in check(family, args.llama_cpp, Path(root)):
                failures += not ok
                print(("ok    " if ok else "WRONG ") + line, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
