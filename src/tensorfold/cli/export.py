"""``tensorfold export DIR --onnx [--int8]``: the ONNX graph (and its dynamic int8 version) of a model that
``tensorfold compress`` wrote from a Hugging Face / sentence-transformers directory, verified against
PyTorch, with the speed and quality of dense fp32, dense int8, compressed fp32 and compressed int8.

>>> import typer
>>> app = typer.Typer()
>>> register(app)
"""

from __future__ import annotations

from pathlib import Path

import typer

from tensorfold.errors import FileFormatError, InvalidArgumentError

EPILOG = (
    "Examples:\n\n"
    "  tensorfold export runs/minilm-50 --onnx --int8\n\n"
    "  tensorfold export runs/minilm-50 --onnx --calib-data held-out.txt --threads 2\n\n"
    "Writes DIR/model.onnx (and DIR/model-int8.onnx) and records the comparison in DIR/metrics.json."
)


def export(
    directory: Path = typer.Argument(..., help="Output directory of 'tensorfold compress' for a model directory."),
    onnx: bool = typer.Option(False, "--onnx", help="Write DIR/model.onnx (required: the one format today)."),
    int8: bool = typer.Option(False, "--int8", help="Also write DIR/model-int8.onnx (dynamic int8 weights per "
                                                    "output channel; for encoders an ONNX Runtime graph with its "
                                                    "fused transformer ops)."),
    calib_data: Path = typer.Option(None, "--calib-data",
                                    help="Text to verify and compare on (its held-out part, split with the compress "
                                         "run's seed); default: the compress run's own held-out part, recorded "
                                         "in DIR/hf.json."),
    text_field: str = typer.Option(None, "--text-field", help="The .jsonl field or .csv column holding the text."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for the speed comparison."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing ONNX files in DIR."),
) -> None:
    """Export a compressed model to ONNX (optionally int8) and compare the four variants."""
    if not onnx:
        raise InvalidArgumentError("choose a format: --onnx (with --int8 for dynamic int8 weights)")
    if threads < 1:
        raise InvalidArgumentError(f"--threads must be >= 1, got {threads}")
    if not (directory / "hf.json").is_file():
        raise FileFormatError(f"{directory} was not written by 'tensorfold compress --model DIRECTORY' (no hf.json); "
                              f"export works on compressed Hugging Face / sentence-transformers models")

    for name in ("model.onnx", "model-int8.onnx") if int8 else ("model.onnx",):
        if (directory / name).exists() and not overwrite:
            raise InvalidArgumentError(f"{directory / name} already exists; pass --overwrite to replace it")

    import json
    import sys

    from rich.console import Console

    from tensorfold.cli.common import stderr_console, stdout_console
    from tensorfold.compression.export import ExportInputs, describe_variant, export_directory
    from tensorfold.compression.hf_storage import base_directory, read_info
    from tensorfold.compression.storage import load_compressed, read_metrics
    from tensorfold.io import write_text_atomic
    from tensorfold.zoo import hf

    info = read_info(directory)
    compressed = load_compressed(directory)
    base = base_directory(directory, info)
    original = hf.load_model(base)
    kind = info["kind"]
    texts, same = hf.held_out_texts(info.get("split"), calib_data, text_field)
    err = stderr_console()
    err.print(f"held-out text: {len(texts)} samples, " + {True: "the compress run's held-out part",
                                                         False: "NOT the compress run's held-out part",
                                                         None: "split not recorded by the compress run"}[same])
    tokenize = hf.Tokenize(original, kind, base)
    batches = hf.batches_of(tokenize, texts)
    example = tokenize([texts[i % len(texts)] for i in range(32)])
    result = export_directory(directory, compressed, original, ExportInputs(kind, batches, example, threads),
                              int8=int8, overwrite=overwrite, log=err.print)
    metrics = read_metrics(directory)
    metrics["export"] = {**result, "held_out": {"samples": len(texts), "same_as_compress": same}}
    write_text_atomic(directory / "metrics.json", json.dumps(metrics, indent=1))
    # a pipe or a log file gets wide lines instead of ones folded into 80 columns
    console = stdout_console() if sys.stdout.isatty() else Console(highlight=False, width=150)
    console.print(f"ops: {', '.join(result['ops'])}")
    if int8:
        console.print(f"int8 ops: {', '.join(result['int8_ops'])} (quantized from the "
                      f"{result['int8_from']})")
    for row in result["variants"]:
        console.print(describe_variant(row))
    console.print(f"wrote {', '.join(str(directory / f) for f in result['files'])}")


def register(app: typer.Typer) -> None:
    app.command("export", epilog=EPILOG)(export)
