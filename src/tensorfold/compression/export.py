"""ONNX export of compressed Hugging Face / sentence-transformers models, dynamic int8, and the
four-variant comparison (dense fp32, dense int8, compressed fp32, compressed int8).

The graph comes from torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17,
offline; no onnxscript needed) with the batch and sequence axes dynamic; it holds standard ONNX ops only
(the factorized layers are plain MatMul/Gemm/Conv). The inputs are the tokenizer's tensors
(``input_ids``, ``attention_mask``, ``token_type_ids`` when the model takes them); the output is the
sentence embedding (sentence-transformers; the masked mean of the last hidden state for a plain encoder)
or the logits (classifiers, causal LMs).
``int8`` quantizes the weights dynamically with ``onnxruntime.quantization`` (QInt8 weights with one scale per
output channel, activations quantized per call). For encoders the int8 file is quantized from ONNX Runtime's
fused transformer graph (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization: com.microsoft
ops, so ``model-int8.onnx`` is an ONNX Runtime graph while ``model.onnx`` stays standard ONNX), falling back to
the plain graph, with the reason recorded, where the fusion does not apply or does not match PyTorch
(:func:`int8_source`). Every fp32 graph (plain and fused) is checked against PyTorch on held-out batches
before it is used; an int8 graph is judged by its measured quality.

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


def transformers_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``model`` (itself, or e.g. a SentenceTransformer's encoder)."""
    return [m for m in model.modules() if hasattr(m, "set_attn_implementation") and hasattr(m, "config")]


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Transformers' eager attention while tracing (restored after): its graph is the plain MatMul / Softmax
    pattern that ONNX Runtime's transformer optimizer fuses into one Attention op, where the SDPA
    implementation exports a masked-softmax variant (IsNaN / Where) that it does not recognise. Both are
    standard ONNX ops and compute the same."""
    changed = []
    for m in transformers_models(model):
        was = getattr(m.config, "_attn_implementation", None)
        if was not in (None, "eager"):
            try:
                m.set_attn_implementation("eager")
            except (ValueError, NotImplementedError):  # a model without an eager path keeps its own
                continue
            changed.append((m, was))
    try:
        yield
    finally:
        for m, was in changed:
            m.set_attn_implementation(was)


def export_onnx(model: nn.Module, kind: str, example: dict, path: str | Path) -> Path:
    """Write the ONNX graph of ``model`` (see the module docs) to ``path``; ``example`` is one input batch."""
    _needs_onnx()
    names = list(example)
    wrapper = ExportWrapper(model, kind, names).eval()
    axes = {k: {0: "batch", 1: "sequence"} for k in names}
    axes["output"] = {0: "batch", 1: "sequence"} if kind == "causal-lm" else {0: "batch"}
    path = Path(path)
    with (warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(),
          eager_attention(model)):
        warnings.simplefilter("ignore")  # the TorchScript exporter warns about tracing branches and deprecation
        torch.onnx.export(wrapper, tuple(example[k] for k in names), str(path), dynamo=False, opset_version=OPSET,
                          input_names=names, output_names=["output"], dynamic_axes=axes)
    return path


def quantize_int8(src: str | Path, dst: str | Path, *, per_channel: bool = True) -> Path:
    """Dynamic int8 quantization of the ONNX graph ``src`` (QInt8 weights, activations quantized per call)
    written to ``dst``.

    ``per_channel`` (default) gives every output column of a weight its own scale: one scale per matrix lets
    the column with the largest weights set the step for all of them. Measured on MiniLM (1,468 held-out
    sentences, bench/export.py): mean cosine to fp32 0.962 per tensor, 0.993 per channel, at the same speed.
    """
    onnx, _ = _needs_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused graph's com.microsoft ops have no shape inference: their outputs are float32
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(dst)


def encoder_shape(model: nn.Module, kind: str) -> tuple[int, int] | None:
    """``(heads, hidden size)`` of the BERT-style encoder inside ``model``, or None when the fused int8 graph
    does not apply (causal LMs; models without such a config)."""
    if kind == "causal-lm":
        return None
    for m in transformers_models(model):
        heads, hidden = getattr(m.config, "num_attention_heads", None), getattr(m.config, "hidden_size", None)
        if isinstance(heads, int) and isinstance(hidden, int):
            return heads, hidden
    return None


def fuse_encoder(src: str | Path, dst: str | Path, heads: int, hidden: int) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, model type ``bert``, its
    own fusions only: ``opt_level=0`` bakes in nothing specific to this CPU) on the graph ``src``, written to
    ``dst``; returns how many of each fused op it made. The fused graph holds com.microsoft ops (Attention,
    EmbedLayerNormalization, SkipLayerNormalization, BiasGelu): an ONNX Runtime graph, never ``model.onnx``.
    Attention keeps the raw 0/1 attention mask (the optimizer's BERT default turns it into sequence lengths,
    which assumes right padding). Raises TensorfoldError when nothing was fused."""
    _needs_onnx()
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    with contextlib.redirect_stdout(io.StringIO()), _quiet():
        optimized = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0,
                                   optimization_options=options)
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    if not fused:
        raise TensorfoldError("the transformer optimizer found nothing to fuse")
    optimized.save_model_to_file(str(dst))
    return fused


@contextlib.contextmanager
def _quiet():
    """Log records below ERROR dropped: the optimizer logs every pattern it tried and missed (from loggers
    named after its modules, outside any ``onnxruntime`` hierarchy) and the quantizer advises pre-processing
    on every call."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def int8_source(fp32: str | Path, model: nn.Module, kind: str, batches: list[dict], threads: int = 2, *,
                fuse: bool = True) -> tuple[Path, dict]:
    """The graph to quantize to int8 and a record of the choice (``{"graph": "fused", "fused": {op: n}}`` or
    ``{"graph": "plain", "reason": ...}``).

    The fused graph (:func:`fuse_encoder`) is used only when it applies and matches PyTorch on ``batches``
    within :data:`FP32_TOLERANCE`, as ``model.onnx`` must; otherwise the verified plain graph ``fp32`` is
    quantized. Compressed blocks can break the optimizer's patterns (low-rank pairs, fewer query/key
    dimensions per head): then it fuses less or nothing, and a fused graph that computed something else would
    be caught here and not kept. Measured on MiniLM (bench/export.py, 2 threads, batch 32): the int8 graph
    quantized from the fused one runs 7-10% faster than from the plain one, at the same quality."""
    fp32 = Path(fp32)
    shape = encoder_shape(model, kind) if fuse else None
    if shape is None:
        return fp32, {"graph": "plain", "reason": "fusion off" if not fuse else
                      "no BERT-style encoder (the fused graph is for encoders)"}
    fused_path = fp32.with_name(fp32.stem + "-fused.onnx")
    try:
        fused = fuse_encoder(fp32, fused_path, *shape)
        verify(fused_path, model, kind, batches, threads)
    # the optimizer is third-party pattern matching: whatever it raises, the plain graph is the safe answer
    except Exception as exc:
        fused_path.unlink(missing_ok=True)
        return fp32, {"graph": "plain", "reason": f"fused graph not used: {exc}"}
    return fused_path, {"graph": "fused", "fused": fused}


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
                     extra: dict[str, nn.Module] | None = None, fuse: bool = True) -> list[dict]:
    """Speed (``repeats`` rounds of :func:`timed_rounds` over ``inputs.timing``, else ``inputs.example``; see
    :func:`speed_summary`) and quality on ``inputs.eval_batches`` of dense fp32, dense int8, compressed fp32
    and compressed int8 (plus ``extra`` models, each fp32 and int8). Graphs are written into ``directory``
    (``dense.onnx``, ``dense-int8.onnx``, ``model.onnx``, ``model-int8.onnx``, ``NAME.onnx`` ...). Each int8
    graph is quantized from the fused graph where it applies and verifies (``fuse``; :func:`int8_source`),
    the same recipe for every model; its int8 row records which (``int8_graph``)."""
    from tensorfold.zoo import hf

    kind, eval_batches, example, threads = inputs.kind, inputs.eval_batches, inputs.example, inputs.threads
    directory = Path(directory)
    models = {"dense": original, "compressed": compressed, **(extra or {})}
    files = {"dense": "dense", "compressed": "model"}
    runners: dict[str, Callable[[dict], torch.Tensor]] = {}
    sources: dict[str, dict] = {}
    for name, model in models.items():
        stem = files.get(name, name)
        fp32 = export_onnx(model, kind, example, directory / f"{stem}.onnx")
        verify(fp32, model, kind, eval_batches[:2], threads)
        source, sources[name] = int8_source(fp32, model, kind, eval_batches[:2], threads, fuse=fuse)
        int8 = quantize_int8(source, directory / f"{stem}-int8.onnx")
        sess = session(int8, threads)
        wrapper = ExportWrapper(model, kind, list(example)).eval()
        runners[f"{name} fp32"] = lambda b, w=wrapper: w(*(b[k] for k in w.input_names))
        runners[f"{name} int8"] = lambda b, s=sess: run_session(s, b)
        log(f"exported {name}: {fp32.name}, {int8.name} (from the {describe_source(sources[name])})")
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
        int8 = k.endswith("int8")
        rows.append({"variant": k, "runtime": "onnxruntime" if int8 else "pytorch",
                     **speed_summary(times["dense fp32"], times[k]), **q, "quality_keys": list(q),
                     **({"int8_graph": sources[k.rsplit(" ", 1)[0]]} if int8 else {})})
    return rows


def describe_source(record: dict) -> str:
    """Which graph an int8 file was quantized from, in words (see :func:`int8_source`)."""
    if record["graph"] == "fused":
        return "fused graph: " + ", ".join(f"{n} {op}" for op, n in record["fused"].items())
    return f"plain graph; {record['reason']}"


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
    result = {"files": keep, "opset": OPSET, "ops": sorted(graph_ops(directory / ONNX_FILE)),
              "threads": inputs.threads, "batch": len(inputs.example["input_ids"]), "variants": rows}
    if int8:
        result["int8_ops"] = sorted(graph_ops(directory / INT8_FILE))
        result["int8_graph"] = next(r["int8_graph"] for r in rows if r["variant"] == "compressed int8")
        result["int8_from"] = describe_source(result["int8_graph"])
    return result


__all__ = ["ExportInputs", "compare_variants", "describe_source", "describe_variant", "eager_attention",
           "encoder_shape", "export_directory", "export_onnx", "fuse_encoder", "int8_source", "quantize_int8",
           "speed_summary", "timed_rounds", "verify"]
