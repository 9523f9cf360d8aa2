"""The int8 export recipe (compression.export): weights quantized per output channel, and the int8 file
quantized from ONNX Runtime's fused transformer graph where that graph applies and matches PyTorch, else
from the plain one with the reason recorded. Tiny randomly initialised models built from configs; numbers
only (speed figures live in bench/export.py)."""

from __future__ import annotations

import hf_tiny
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tensorfold.compression import export  # noqa: E402
from tensorfold.errors import TensorfoldError  # noqa: E402


def outlier_bert(init: float = 0.1):
    """A tiny BERT encoder whose Linear layers' output channels have scales spread over ~e^+-2 (as trained
    transformers have: a few channels carry much larger weights than the rest)."""
    model = hf_tiny.bert_encoder(layers=2, hidden=64, heads=4, inter=128, init=init)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(torch.exp(torch.randn(m.out_features, 1, generator=gen)))
    return model


def reference(model, kind: str, batches: list[dict]) -> torch.Tensor:
    wrapper = export.ExportWrapper(model, kind, list(batches[0])).eval()
    with torch.no_grad():
        return torch.cat([wrapper(*(b[k] for k in wrapper.input_names)) for b in batches])


def onnx_outputs(path, batches: list[dict]) -> torch.Tensor:
    sess = export.session(path, threads=1)
    return torch.cat([export.run_session(sess, b) for b in batches])


def test_per_channel_int8_is_closer_to_fp32_than_per_tensor(tmp_path):
    model, batches = outlier_bert(), hf_tiny.token_batches(4, 8, 12)
    fp32 = export.export_onnx(model, "encoder", batches[0], tmp_path / "m.onnx")
    ref = reference(model, "encoder", batches)
    errors = {}
    for per_channel in (False, True):
        q = export.quantize_int8(fp32, tmp_path / f"q-{per_channel}.onnx", per_channel=per_channel)
        out = onnx_outputs(q, batches)
        errors[per_channel] = (float(1 - F.cosine_similarity(out, ref).mean()), float((out - ref).norm() / ref.norm()))
    # measured: cosine distance 0.0024 per tensor, 0.00026 per channel; relative error 0.070 and 0.023
    (cos_t, rel_t), (cos_c, rel_c) = errors[False], errors[True]
    assert cos_c < 0.25 * cos_t and rel_c < 0.5 * rel_t
    assert 0 < rel_c < 0.05  # still int8: not the fp32 graph by mistake
    # the default is per channel
    assert export.quantize_int8.__kwdefaults__["per_channel"] is True


def test_fused_graph_equals_the_plain_graph_and_keeps_model_onnx_standard(tmp_path):
    model = outlier_bert()
    batches = hf_tiny.token_batches(4, 8, 12)
    left = {k: v.clone() for k, v in batches[1].items()}  # left padding: the fused Attention gets the raw mask
    left["attention_mask"] = left["attention_mask"].flip(1)
    fp32 = export.export_onnx(model, "encoder", batches[0], tmp_path / "model.onnx")
    assert model.config._attn_implementation == "sdpa"  # eager only while tracing
    assert all(":" not in op for op in export.graph_ops(fp32))
    source, record = export.int8_source(fp32, model, "encoder", batches[:2], threads=1)
    assert record == {"graph": "fused", "fused": {"EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2,
                                                  "SkipLayerNormalization": 4}}
    assert source.name == "model-fused.onnx"
    assert {"com.microsoft:Attention", "com.microsoft:SkipLayerNormalization"} <= export.graph_ops(source)
    assert "Softmax" not in export.graph_ops(source)
    ref = reference(model, "encoder", [*batches, left])
    for path in (fp32, source):
        out = onnx_outputs(path, [*batches, left])
        assert float((out - ref).abs().max() / ref.abs().max()) < export.FP32_TOLERANCE
    # quantized from the fused graph: its com.microsoft ops in int8 form, as close to fp32 as from the plain one
    from_fused = export.quantize_int8(source, tmp_path / "fused-int8.onnx")
    from_plain = export.quantize_int8(fp32, tmp_path / "plain-int8.onnx")
    assert "com.microsoft:QAttention" in export.graph_ops(from_fused)
    assert not any(":" in op for op in export.graph_ops(from_plain))
    cos = {p.name: float(F.cosine_similarity(onnx_outputs(p, batches), ref[:32]).mean())
           for p in (from_fused, from_plain)}
    assert cos["fused-int8.onnx"] == pytest.approx(cos["plain-int8.onnx"], abs=2e-4)


def test_int8_falls_back_to_the_plain_graph_with_a_reason(tmp_path, monkeypatch):
    model = outlier_bert()
    batches = hf_tiny.token_batches(2, 8, 12)
    fp32 = export.export_onnx(model, "encoder", batches[0], tmp_path / "model.onnx")
    # not an encoder / turned off
    assert export.int8_source(fp32, model, "causal-lm", batches) == (
        fp32, {"graph": "plain", "reason": "no BERT-style encoder (the fused graph is for encoders)"})
    assert export.int8_source(fp32, model, "encoder", batches, fuse=False)[1]["reason"] == "fusion off"

    # a fused graph that computes something else is caught and deleted, never used
    real = export.fuse_encoder

    def wrong(src, dst, heads, hidden):
        import onnx
        from onnx import numpy_helper

        fused = real(src, dst, heads, hidden)
        graph = onnx.load(str(dst))
        big = max(graph.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
        onnx.save(graph, str(dst))
        return fused

    monkeypatch.setattr(export, "fuse_encoder", wrong)
    source, record = export.int8_source(fp32, model, "encoder", batches, threads=1)
    assert source == fp32 and record["graph"] == "plain"
    assert record["reason"].startswith("fused graph not used: the exported graph") and "differs" in record["reason"]
    assert not (tmp_path / "model-fused.onnx").exists()

    # nothing to fuse, or the optimizer itself failing: the same fallback
    def nothing(*args):
        raise TensorfoldError("the transformer optimizer found nothing to fuse")

    monkeypatch.setattr(export, "fuse_encoder", nothing)
    assert export.int8_source(fp32, model, "encoder", batches)[1] == {
        "graph": "plain", "reason": "fused graph not used: the transformer optimizer found nothing to fuse"}
    monkeypatch.setattr(export, "fuse_encoder", lambda *a: 1 / 0)
    assert "division by zero" in export.int8_source(fp32, model, "encoder", batches)[1]["reason"]


def test_eager_attention_is_restored_even_when_tracing_fails():
    model = outlier_bert()
    with pytest.raises(RuntimeError, match="boom"), export.eager_attention(model):
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert export.encoder_shape(model, "encoder") == (4, 64)
    assert export.encoder_shape(model, "causal-lm") is None
    assert export.encoder_shape(torch.nn.Linear(2, 2), "encoder") is None
