"""`sw ablate`, `sw export` and `sw quantize`: change the super weights, or tell a quantizer to keep them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import Session, stdout
from .options import (BATCH_SIZE, CONTROL, CONTROL_SEED, COORD, COORDS, DATA_DIR, DEBUG, EXPORT_SELECT, FACTOR, FORCE_OUT_DIR, JSON,
                      MAX_LENGTH, MODE, MODEL_ARG, QUIET, SELECT, TOP, first_documents, loads_model, print_table,
                      typed_options)


@loads_model()
def ablate(
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    mode: Optional[str] = MODE,
    factor: Optional[str] = FACTOR,
    control: Optional[str] = CONTROL,
    top: Optional[int] = TOP,
    seed: int = CONTROL_SEED,
    out: Path = typer.Option(..., "--out", "-o", metavar="DIR", help="Directory for the ablated model (safetensors)."),
    force: bool = FORCE_OUT_DIR,
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Zero or rescale super weights (or a control) and save the model.

    Writes safetensors, the tokenizer and superweight_ablation.json (what changed, original
    values) to --out, atomically; never into the source model's directory.

    Examples:

      sw ablate --coords smollm2-135m.superweights.yaml --out smollm2-no-sw

      sw ablate llama-7b --coord 2,3968,7003 --mode scale --factor 2 --out llama-7b-sw-x2

      sw ablate --coords c.yaml --control outliers --top 7000 --out smollm2-no-outliers
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.ablate import ablate_model

        result = ablate_model(model, out=out, coords=coords, coord=coord, select=select, mode=mode, factor=factor, control=control,
                              top=top, seed=seed, force=force, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
        else:
            stdout.print(f"{result.description}; model written to {out}")

    session.run(work)

@loads_model("revision", "gguf_file", "trust_remote_code", "cache_dir")
def export(
    coords_file: Path = typer.Argument(..., metavar="COORDS", help="Coordinates file from `sw detect` (YAML or JSON)."),
    select: str = EXPORT_SELECT,
    to: str = typer.Option(..., "--to", metavar="FORMAT", help="llama.cpp (llama-quantize --tensor-type-file), bitsandbytes "
                                             "(llm_int8_skip_modules / modules_to_not_convert) or llm-compressor "
                                             "(a recipe's ignore list)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL", help="Model to check the names against (default: "
                                                                    "the file's `model:`, else smollm2-135m)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", metavar="FILE", help="llama.cpp: the GGUF you will quantize, to check the "
                                                             "tensor names in (default: MODEL itself when a GGUF)."),
    ggml_type: str = typer.Option("f16", "--type", metavar="TYPE", help="llama.cpp: the type those tensors keep (default f16)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="FILE", help="Write to FILE (default: stdout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """What a real quantizer needs to keep the super weights' matrices in high precision.

    The names are this model's own, checked against it (built from its config, no weights loaded)
    and, for llama.cpp, against the GGUF's tensor list.

    Examples:

      sw export smollm2-135m.superweights.yaml --to llama.cpp --out smollm2.tensor-types.txt

      sw export c.yaml --to bitsandbytes --model meta-llama/Llama-2-7b-hf --out skip.json

      sw export c.yaml --to llm-compressor --out recipe.yaml
    """
    session = Session(quiet, debug)

    def work() -> None:
        from ..commands.export import export_names

        exported = export_names(coords_file, to=to, model=model, gguf=gguf, ggml_type=ggml_type, out=out, select=select,
                                force=force, options=options, reporter=session)
        if exported is None:  # another rank than 0 under a launcher
            return
        result = exported.export
        if as_json:
            typer.echo(json.dumps(exported.to_dict(), indent=2))
        elif out is None:
            typer.echo(result.content, nl=False)
        session.say(f"{len(result.modules)} matrix(es) kept: {', '.join(result.gguf_tensors or result.modules)}; "
                    f"checked against {'; '.join(result.checked)}")
        if out is not None and not as_json:
            stdout.print(f"{to} names written to {out}; use with: {result.usage}", soft_wrap=True, markup=False)

    session.run(work)


@loads_model()
def quantize(
    ctx: typer.Context,
    model: Optional[str] = MODEL_ARG,
    coords: Optional[Path] = COORDS,
    coord: Optional[list[str]] = COORD,
    select: str = SELECT,
    bits: int = typer.Option(4, "--bits", metavar="N", help="Weight bits, 2..8 (default 4)."),
    quantizer: str = typer.Option("rtn", "--quantizer", metavar="NAME", help="rtn (the paper's round-to-nearest, "
                                  "default), llama.cpp, llm-compressor, quanto or bitsandbytes: run it naive and with "
                                  "the super weights' matrices kept (sw export's names), and compare."),
    scheme: Optional[str] = typer.Option(None, "--scheme", metavar="S", help="The quantizer's scheme (Q4_K_M, "
                                         "W4A16-g64, qint4-axis, nf4, ...; default: its 4-bit one)."),
    quantizer_path: Optional[str] = typer.Option(None, "--quantizer-path", metavar="PATH", help="llama.cpp: the folder "
                                                 "with llama-quantize (env SUPERWEIGHT_LLAMA_CPP); others: the Python "
                                                 "or venv that has the package (env SUPERWEIGHT_QUANTIZER_PYTHON)."),
    block_size: Optional[list[str]] = typer.Option(None, "--block-size", metavar="N", help="Elements per 1-D block; repeatable "
                                                   "(default: a grid that suits the model's matrix sizes)."),
    z: str = typer.Option("9", "--z", metavar="Z|auto", help="Clip weights with |z-score| above this before "
                                                             "quantizing (paper: 9); auto: per matrix, the threshold "
                                                             "with the least largest rounding error."),
    activations: bool = typer.Option(False, "--activations", help="Also compare per-sequence activation RTN of the "
                                                                   "down-projection input, naive vs super-activation-aware."),
    activation_bits: Optional[int] = typer.Option(None, "--activation-bits", metavar="N", help="Bits for --activations "
                                                  "(default 8)."),
    task: list[str] = typer.Option(["wikitext"], "--task", "-t", metavar="TASK", help="Tasks to evaluate, repeatable or comma-separated (default wikitext)."),
    data_dir: Optional[str] = DATA_DIR,
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="First N documents of each task."),
    max_length: Optional[int] = MAX_LENGTH,
    batch_size: str = BATCH_SIZE,
    plot: Optional[str] = typer.Option(None, "--plot", metavar="FILE.png", help="Each task's headline metrics vs block size "
                                        "(format from the suffix: .png, .pdf, .svg, ...; PNG without one)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Save the super-weight-aware fake-quantized model "
                                                                 "(needs exactly one --block-size)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out directory or an existing --plot."),
    as_json: bool = JSON,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
    options=None,
) -> None:
    """Round-to-nearest quantization with and without super-weight handling (paper Sec. 4).

    Without --coords/--coord the super weights are detected first.

    Examples:

      sw quantize --limit 5 --block-size 1024 --block-size 65536 --plot rtn.png

      sw quantize llama-7b --coords llama7b.yaml --block-size 16384 --block-size 1048576

      sw quantize --block-size 4096 --out smollm2-w4-bs4096
    """
    session = Session(quiet, debug)
    given = typed_options(ctx)
    if quantizer != "rtn":
        session.run(lambda: _quantize_real(model, quantizer, scheme, quantizer_path, coords, coord, select, task,
                                           data_dir, limit, max_length, batch_size, options, as_json, session, given))
        return

    def work() -> None:
        from ..commands.quantize_real import check_quantizer_options

        check_quantizer_options(quantizer, given)
        from ..commands.quantize import quantize_model
        from ..measure.quantized import quantization_warnings
        from ..edit.quantize import AUTO_Z

        result = quantize_model(
            model, coords=coords, coord=coord, select=select, bits=bits, block_size=block_size, z=z, activations=activations,
            activation_bits=activation_bits, task=task, data_dir=data_dir, limit=limit, max_length=max_length,
            batch_size=batch_size, plot=plot, out=out, force=force, options=options, reporter=session)
        if result is None:  # another rank than 0: rank 0 prints
            return
        for line in quantization_warnings(result.rows):
            session.say(f"warning: {line}")
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        table = result.weight_table()
        z_label = result.z if result.z == AUTO_Z else f"{result.z:g}"
        print_table(f"{result.spec}: INT{bits} RTN, naive vs super-weight aware (z={z_label})" + first_documents(limit),
                     tuple(table.columns), [tuple(r) for r in table.rows])
        if result.activation_rows:
            table = result.activation_table()
            print_table("down-projection input, per-sequence RTN (aware: super activation held out)",
                         tuple(table.columns), [tuple(r) for r in table.rows])

    session.run(work)


def _quantize_real(model, quantizer, scheme, quantizer_path, coords, coord, select, task, data_dir, limit, max_length,
                   batch_size, options, as_json, session, given) -> None:
    """`sw quantize --quantizer NAME`: a real quantizer, naive vs protected."""
    from ..commands.quantize_real import check_quantizer_options, quantize_with

    check_quantizer_options(quantizer, given)

    result = quantize_with(model, quantizer=quantizer, scheme=scheme, quantizer_path=quantizer_path, coords=coords,
                           coord=coord, select=select, task=task, data_dir=data_dir, limit=limit,
                           max_length=max_length, batch_size=batch_size, options=options, reporter=session)
    if result is None:  # another rank than 0: rank 0 prints
        return
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    columns, rows = result.table()
    print_table(f"{result.document['model']['spec']}: {quantizer} {result.document['scheme']}, naive vs super "
                f"weights' matrices kept ({result.document['scored_by']})" + first_documents(limit),
                tuple(columns), [tuple(r) for r in rows])
