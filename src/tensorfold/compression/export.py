"""ONNX export of compressed Hugging Face / sentence-transformers models, dynamic int8, and the
four-variant comparison (dense fp32, dense int8, compressed fp32, compressed int8).

The graph comes from torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17,
offline; no onnxscript needed) with the batch and sequence axes dynamic; it holds standard ONNX ops only
(the factorized layers are plain MatMul/Gemm/Conv). The inputs are the tokenizer's tensors
(``input_ids``, ``attention_mask``, ``token_type_ids`` when the model takes them); the output is the
sentence embedding (sentence-transformers; the masked mean of the last hidden state for a plain encoder)
or the logits (classifiers, causal LMs).
``int8`` quantizes the weights of the exported graph dynamically with ``onnxruntime.quantization``
(QInt8 weights, activations quantized per call). Every exported graph is checked against PyTorch on
held-out batches before it is kept.

"fp32" variants run in PyTorch and "int8" ones in ONNX Runtime (default session settings: worker threads
spin between calls), as a user would deploy each; all are timed in one process, taking turns round by
round at batch 32 with the same thread count (:func:`timed_rounds`): seconds are medians over the rounds,
speedups the median of per-round ratios to dense fp32, each with its quartiles. Their quality is measured
against the dense PyTorch model on the held-out text with the metrics of the model's kind.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tensorfold.compression.evaluate import _quartiles
from tensorfold.errors import TensorfoldError

ONNX_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
OPSET = 17
# ONNX Runtime's fp32 graph must match PyTorch to float32 rounding (relative to the output's scale)
FP32_TOLERANCE = 1e-3


class ExportWrapper(nn.Module):
    """Positional tensor inputs -> the model's embedding or logits (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, kind: str, input_names: list[str]):
        super().__init__()
        self.model, self.kind, self.input_names = model, kind, list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from tensorfold.zoo import hf

        return hf.model_outputs(self.model, self.kind, [dict(zip(self.input_names, inputs))])[0]


def _needs_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise TensorfoldError(f"ONNX export needs onnx and onnxruntime (pip install 'tensorfold[hf]'): {exc}") from None
    return onnx, onnxruntime


def export_onnx(model: nn.Module, kind: str, example: dict, path: str | Path) -> Path:
    """Write the ONNX graph of ``model`` (see the module docs) to ``path``; ``example`` is one input batch."""
    _needs_onnx()
    names = list(example)
    wrapper = ExportWrapper(model, kind, names).eval()
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["output"] = {0: "batch", 1: "sequence"} if kind == "causal-lm" else {0: "batch"}
    path = Path(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about tracing branches and deprecation
        torch.onnx.export(wrapper, tuple(example[k] for k in names), str(path), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=["output"], dynamic_axes=axes)
    return path


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization of the ONNX graph ``src`` (QInt8 weights) written to ``dst``."""
    _needs_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


def session(path: str | Path, threads: int = 2):
    """An ONNX Runtime CPU session using ``threads`` intra-op threads."""
    _, ort = _needs_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, batch: dict) -> torch.Tensor:
    wanted = {i.name for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in batch.items() if k in wanted})[0])


def graph_ops(path: str | Path) -> set[str]:
    """The op types in the graph (``domain:op`` for ops outside the standard ONNX domain)."""
    onnx, _ = _needs_onnx()
    graph = onnx.load(str(path), load_external_data=False).graph
    return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in graph.node}


def verify(path: str | Path, model: nn.Module, kind: str, batches: list[dict], threads: int = 2) -> float:
    """Largest deviation of the ONNX graph's output from PyTorch on ``batches``, relative to the output's
    largest magnitude; raises when it exceeds float32 rounding."""
    sess = session(path, threads)
    wrapper = ExportWrapper(model, kind, list(batches[0])).eval()
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            ref = wrapper(*(batch[k] for k in wrapper.input_names))
            got = run_session(sess, batch)
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    if worst > FP32_TOLERANCE:
        raise TensorfoldError(f"the exported graph {path} differs from the PyTorch model by {worst:.2e} (relative); "
                              f"not kept")
    return worst


def timed_rounds(passes: dict[str, Callable[[], object]], rounds: int, *, timed: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of one pass of each variant, one figure per round (the median of its ``timed`` passes).

    Variants take turns round by round, so load that comes and goes reaches all of them alike. In its turn a
    variant first runs one pass untimed: measured on MiniLM here (2 cores, one process), ONNX Runtime int8
    passes timed right after a PyTorch pass ran either ~123 or ~150 ms a batch (median 150, quartiles 125-151
    in one process, 123-132 in the next), while passes that followed a pass of their own stayed within 3%
    in every process. The untimed pass absorbs the switch between the two runtimes' thread pools.
    """
    seconds: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            run()
            own = []
            for _ in range(timed):
                t0 = clock()
                run()
                own.append(clock() - t0)
            seconds[name].append(statistics.median(own))
    return seconds


@dataclass(frozen=True)
class ExportInputs:
    """What the export is checked and timed on: the model's kind (see ``tensorfold.zoo.hf.KINDS``),
    held-out batches for verification and quality, one batch to trace (and to time), the CPU threads to
    use, and optionally several batches to time instead (one timed pass runs them all)."""

    kind: str
    eval_batches: list = field(repr=False)
    example: dict = field(repr=False)
    threads: int = 2
    timing: list | None = field(default=None, repr=False)


def compare_variants(original: nn.Module, compressed: nn.Module, inputs: ExportInputs, directory: str | Path, *,
                     repeats: int = 7, log: Callable[[str], None] = lambda msg: None,
                     extra: dict[str, nn.Module] | None = None) -> list[dict]:
    """Speed (``repeats`` rounds of :func:`timed_rounds` over ``inputs.timing``, else ``inputs.example``; see
    :func:`speed_summary`) and quality on ``inputs.eval_batches`` of dense fp32, dense int8, compressed fp32
    and compressed int8 (plus ``extra`` models, each fp32 and int8). Graphs are written into ``directory``
    (``dense.onnx``, ``dense-int8.onnx``, ``model.onnx``, ``model-int8.onnx``, ``NAME.onnx`` ...)."""
    from tensorfold.zoo import hf

    kind, eval_batches, example, threads = inputs.kind, inputs.eval_batches, inputs.example, inputs.threads
    directory = Path(directory)
    models = {"dense": original, "compressed": compressed, **(extra or {})}
    files = {"dense": "dense", "compressed": "model"}
    runners: dict[str, Callable[[dict], torch.Tensor]] = {}
    for name, model in models.items():
        stem = files.get(name, name)
        fp32 = export_onnx(model, kind, example, directory / f"{stem}.onnx")
        verify(fp32, model, kind, eval_batches[:2], threads)
        int8 = quantize_int8(fp32, directory / f"{stem}-int8.onnx")
        sess = session(int8, threads)
        wrapper = ExportWrapper(model, kind, list(example)).eval()
        runners[f"{name} fp32"] = lambda b, w=wrapper: w(*(b[k] for k in w.input_names))
        runners[f"{name} int8"] = lambda b, s=sess: run_session(s, b)
        log(f"exported {name}: {fp32.name}, {int8.name}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            reference = [runners["dense fp32"](b) for b in eval_batches]
            outputs = {k: [run(b) for b in eval_batches] for k, run in runners.items()}
            timing = inputs.timing or [example]
            times = timed_rounds({k: lambda run=run: [run(b) for b in timing] for k, run in runners.items()},
                                 repeats)
    finally:
        torch.set_num_threads(old)
    rows = []
    for k in runners:
        q = hf.outputs_quality(kind, reference, outputs[k], eval_batches)
        rows.append({"variant": k, "runtime": "onnxruntime" if k.endswith("int8") else "pytorch",
                     **speed_summary(times["dense fp32"], times[k]), **q, "quality_keys": list(q)})
    return rows


def speed_summary(dense: list[float], variant: list[float]) -> dict:
    """A variant's seconds per pass (median over rounds, quartiles, best) and its speedup over dense fp32:
    the median of the per-round ratios (each round's two figures were taken minutes apart at most), with
    their quartiles as the spread."""
    s1, s2, s3 = _quartiles(variant)
    r1, r2, r3 = _quartiles([d / v for d, v in zip(dense, variant)])
    return {"seconds": s2, "seconds_q1": s1, "seconds_q3": s3, "seconds_best": min(variant),
            "speedup": r2, "speedup_q1": r1, "speedup_q3": r3, "rounds": len(variant)}


def describe_variant(row: dict) -> str:
    """One line for a measured export variant: median time, speedup with its spread, quality."""
    spread = f" ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}x)" if "speedup_q1" in row else ""
    return (f"{row['variant']:>16} ({row['runtime']}): {row['seconds'] * 1e3:8.1f} ms  {row['speedup']:5.2f}x{spread}  "
            + ", ".join(f"{k} {row[k]:.4f}" for k in row.get("quality_keys", [])))


def export_directory(directory: str | Path, compressed: nn.Module, original: nn.Module, inputs: ExportInputs, *,
                     int8: bool = True, overwrite: bool = True, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Export ``compressed`` into ``directory`` (``model.onnx`` and with ``int8`` ``model-int8.onnx``) and
    measure the four variants; returns what metrics.json records under ``export``."""
    from tensorfold.errors import InvalidArgumentError

    directory = Path(directory)
    keep = [ONNX_FILE, INT8_FILE] if int8 else [ONNX_FILE]
    for name in keep:
        if (directory / name).exists() and not overwrite:
            raise InvalidArgumentError(f"{directory / name} already exists; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        rows = compare_variants(original, compressed, inputs, scratch, log=log)
        for name in keep:  # a rename inside one file system: each file appears whole or not at all
            (Path(scratch) / name).replace(directory / name)
    return {"files": keep, "opset": OPSET, "ops": sorted(graph_ops(directory / ONNX_FILE)),
            "threads": inputs.threads, "batch": len(inputs.example["input_ids"]), "variants": rows}


__all__ = ["ExportInputs", "compare_variants", "describe_variant", "export_directory", "export_onnx", "quantize_int8",
           "speed_summary", "timed_rounds", "verify"]
