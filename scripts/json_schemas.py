"""Writes docs/json/<command>.schema.json, the documented shape of each command's --json (run from the
repository root after changing one; tests/test_json_schemas.py validates real outputs against them)."""
import json
from pathlib import Path

from superweight.measure.configurations import KINDS  # one list of configuration kinds
OUT = Path("docs/json")
S = "https://json-schema.org/draft/2020-12/schema"
num = {"type": "number"}; int_ = {"type": "integer"}; str_ = {"type": "string"}; bool_ = {"type": "boolean"}
def nullable(t): return {"anyOf": [t, {"type": "null"}]}
def arr(t): return {"type": "array", "items": t}
def obj(props, required=None, extra=True, desc=None):
    o = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if desc: o["description"] = desc
    return o
stderr = {"anyOf": [num, {"const": "N/A"}], "description": "a standard error; \"N/A\" where none is computed (lm-eval's mark)"}
weight = obj({"layer": int_, "row": int_, "col": int_, "expert": {"type": ["integer", "string"]},
              "value": num, "input_activation": num, "output_spike": num, "token": int_, "iteration": int_,
              "raw_output": num, "concentration": num, "share": num, "residual_after": num,
              "role": {"enum": ["super", "joint", "inert"]}, "perplexity_alone_zeroed": num, "shapley_share": num},
             required=["layer", "row", "col"],
             desc="one weight: down_proj.weight[row, col] of decoder layer `layer`; keys without a value are left out")
coordinate = obj({"layer": int_, "row": int_, "col": int_, "expert": {"type": ["integer", "string"]}}, required=["layer", "row", "col"])
task_results = {"type": "object", "description": "task -> metric -> value, lm-eval's layout: `<metric>` and `<metric>_stderr`",
                "additionalProperties": {"type": "object", "additionalProperties": {"anyOf": [num, str_, {"type": "null"}]}}}
kind = {"enum": list(KINDS),
        "description": "what the configuration does, whatever its name: a stable key for scripts"}
ablation_description = obj({"name": str_, "kind": kind, "mode": nullable({"enum": ["zero", "scale"]}), "factor": nullable(num),
                            "restore_activation": bool_, "control": nullable(str_), "control_seed": nullable(int_),
                            "control_top": nullable(int_), "num_weights": int_,
                            "weights": {"anyOf": [arr(weight), str_]}},
                           desc="what was done to the model before evaluating it")
verification = obj({"text": str_, "num_tokens": int_, "rule": str_, "perplexity": num,
                    "all_zeroed": nullable(num), "restored": nullable(num), "weights": arr(obj({}, [])),
                    "prompts": arr(obj({"prompt": str_, "coordinates": {"type": "array"}, "same": bool_}))},
                   required=["text", "num_tokens", "rule", "perplexity", "weights", "prompts"],
                   desc="what `--verify` measured: perplexity with the weights zeroed, each weight's role")
model_eval = obj({"spec": str_, "location": str_, "kind": str_, "dtype": str_, "superweight_ablation": nullable({"type": "object"})},
                 required=["spec", "location", "kind", "dtype"])
generation = obj({"configuration": str_, "kind": kind, "prompt": str_, "token_ids": arr(int_), "text": str_})

def write(command, description, schema):
    document = {"$schema": S, "$id": f"https://github.com/superweight/superweight/docs/json/{command}.schema.json",
                "title": f"sw {command} --json", "description": description, **schema}
    (OUT / f"{command}.schema.json").write_text(json.dumps(document, indent=2) + "\n")

write("detect", "The detected super weights, the rule that chose them, per-layer evidence, and the registry's coordinates for this model.",
      obj({"model": obj({"spec": str_, "location": str_, "kind": str_, "model_type": str_, "dtype": str_}, ["spec", "location", "kind", "dtype"]),
           "prompt": str_, "num_tokens": int_,
           "rule": obj({"min_spike": num, "min_concentration": num, "min_share": num, "carry_ratio": num, "carry_depth": num}, []),
           "super_weights": arr(weight), "candidate_layers": {"type": "array"}, "cancelling_layers": arr(int_),
           "layers": arr(obj({"layer": int_, "down_proj_input_max": num, "down_proj_output_max": num, "residual_write": num,
                              "row": int_, "col": int_, "token": int_, "share": nullable(num), "concentration": nullable(num),
                              "rejected": nullable(str_)}, ["layer", "down_proj_input_max", "down_proj_output_max", "row", "col"])),
           "known": nullable(obj({"key": str_, "agrees_with": arr(str_),
                                  "entries": arr(obj({"source": str_, "verdict": str_}, ["source", "verdict"])),
                                  "conflicts": arr(str_)},
                                 desc="the registry's coordinates for this model, one entry per source, each compared with what was found")),
           "coordinates_file": nullable(str_), "verification": nullable(verification)},
          required=["model", "prompt", "num_tokens", "rule", "super_weights", "layers", "known", "coordinates_file"]))

recorded_coordinate = obj({
    **coordinate["properties"],
    "iteration": {**int_, "description": "the detection iteration that found it, where the coordinates came from `sw detect`"},
    "role": {"enum": ["super", "joint", "inert"],
             "description": "its role measured by `sw detect --verify`, where known; `sw eval DIR --compare` names its rows by it"},
    "output_spike": {**num, "description": "the output spike the coordinates recorded, where known; --restore-activation "
                                           "on the folder restores above the same threshold"},
    "raw_output": {**num, "description": "the raw down-projection output the coordinates recorded (post-norm families' "
                                         "restore threshold), where known"}}, required=["layer", "row", "col"])
write("ablate", "The model directory written and the weights changed in it.",
      obj({"out": str_, "ablation": obj({"name": {"type": "string", "description": "what was done, as `sw ablate` printed it and `sw eval` names the folder's row"},
                                          "coordinates": arr(recorded_coordinate), "mode": {"enum": ["zero", "scale"]}, "factor": num,
                                          "original_values": arr(num), "new_values": arr(num), "dtype": str_,
                                          "control": nullable({"type": "object"}), "notes": arr(str_)},
                                         ["name", "coordinates", "mode", "original_values", "new_values", "dtype"])}))

write("eval", "Every evaluated configuration, a list whatever the options (a single run is a list of one). "
      "`--output FILE.json` is not this document: it is lm-eval's own layout.",
      obj({"model": model_eval, "tool": str_,
           "configurations": {"type": "array", "minItems": 1, "items": obj(
               {"name": str_, "kind": kind, "ablation": ablation_description, "results": task_results,
                "n_samples": {"type": "object", "additionalProperties": obj({"original": int_, "effective": int_}, [])},
                "config": {"type": "object"}, "data_sha256": {"type": "object"},
                "harness": {"type": "object", "description": "with --harness: lm-eval's tasks and version"}},
               ["name", "kind", "ablation", "results", "n_samples"])}}))

write("generate", "Greedy continuations of each prompt under each configuration.",
      obj({"model": obj({"spec": str_, "location": str_, "dtype": str_}, ["spec"]), "max_new_tokens": int_, "decoding": str_,
           "configurations": arr(ablation_description), "generations": arr(generation), "tool": str_}))

write("export", "What a quantizer needs to keep the super weights' matrices in high precision, and the call that reads it.",
      obj({"format": {"enum": ["llama.cpp", "bitsandbytes", "llm-compressor"]}, "model": str_, "modules": arr(str_),
           "gguf_tensors": arr(str_), "keep": arr(str_), "content": str_,
           "usage": {"type": "string", "description": "a command or call that works as printed: a hub id or a local folder, never an sw alias"},
           "checked": arr(str_), "out": nullable(str_)}))

write("quantize", "Round-to-nearest quantization, naive and super-weight-aware, per block size (and per activation row).",
      obj({"model": obj({"spec": str_, "location": str_, "superweight_ablation": nullable({"type": "object"})},
                        ["spec", "superweight_ablation"]), "bits": int_, "z": {"type": ["number", "string"]},
           "super_weights": arr(coordinate), "unquantized": task_results,
           "weights": arr(obj({"bits": int_, "block_size": int_, "naive": task_results, "aware": task_results,
                               "naive_perplexity": nullable(num), "aware_perplexity": nullable(num),
                               "aware_worse": {"type": "array", "items": str_, "description": "the headline metrics "
                                               "('wikitext word_perplexity', ...) on which aware is worse than naive"}},
                              ["block_size", "naive", "aware", "aware_worse"])),
           "activations": {"type": "array"}, "tool": str_}, ["model", "bits", "super_weights", "unquantized", "weights", "activations", "tool"]))

write("study", "report.json as written: Table 1 as numbers with their standard errors, the scale sweep, the stop-word shift, "
      "the activation profile and generations.",
      obj({"meta": obj({"command": nullable(str_), "model": {"type": "object"}, "tasks": arr(str_), "limit": {"type": ["integer", "string", "null"]},
                        "documents": {"type": "object"}, "seed": int_, "grid": arr(num),
                        "evaluations": obj({"total": int_, "from_cache": int_}), "tool": str_},
                       ["model", "tasks", "limit", "seed", "evaluations", "tool"]),
           "super_weights": arr(weight), "verification": verification,
           "table": obj({"columns": arr(str_), "rows": arr(obj(
               {"configuration": str_, "kind": nullable(kind), "values": arr(nullable(num)),
                "stderrs": {"type": "array", "items": nullable(num), "description": "null where no standard error is computed (word perplexity)"}}))},
               desc="Table 1: `values[j]` is the configuration's value of `columns[j]`, `stderrs[j]` its standard error"),
           "generations": arr(generation),
           "sweep": arr(obj({"factor": num, "perplexity": nullable(num), "avg_acc": nullable(num)})),
           "stop_words": {"type": "object"}, "activation_profile": {"type": "object"}},
          ["meta", "table"]))

write("known", "The registry of published super-weight coordinates: its sources, and each model's entries per source.",
      obj({"sources": {"type": "object", "additionalProperties": obj({"name": str_, "cite": str_})},
           "models": arr(obj({"key": str_, "hub": arr(str_), "alias": nullable(str_),
                              "entries": arr(obj({"source": str_, "source_name": str_, "cite": str_,
                                                  "super_weights": arr(arr({"type": ["integer", "string"]}))})),
                              "conflicts": arr(str_), "notes": nullable(str_)}))}))
