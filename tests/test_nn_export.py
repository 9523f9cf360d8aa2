"""Every factorized layer exports to ONNX as plain Conv/MatMul/Gemm ops and scripts/traces with TorchScript.

ONNX export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which
works offline; the graphs are run in onnxruntime and compared with PyTorch.
"""

import io
import warnings

import numpy as np
import pytest
import torch

from tensorfold.nn import CPConv, LowRankLinear, SVDConv, TTLinear, TuckerConv

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SHAPE_OPS = {"Reshape", "Transpose", "Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Slice", "Cast",
             "Squeeze", "ConstantOfShape", "Div", "Mul"}


def _cases():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1)
    grouped = torch.nn.Conv2d(8, 12, 3, padding=2, dilation=2, groups=2, bias=False)
    conv1d = torch.nn.Conv1d(6, 10, 5, stride=2, padding=2)
    reflect = torch.nn.Conv2d(8, 12, 3, padding=1, padding_mode="reflect")
    linear = torch.nn.Linear(48, 60)
    x2, x1 = (2, 8, 10, 10), (2, 6, 17)
    return [
        ("lowrank", LowRankLinear.from_dense(linear, 7), (3, 48), {"MatMul", "Gemm"}),
        ("svd", SVDConv.from_dense(conv, 5), x2, {"Conv", "MatMul", "Add"}),  # 1x1 convs run as MatMul
        ("svd-groups", SVDConv.from_dense(grouped, 3), x2, {"Conv"}),
        ("spatial", SVDConv.from_dense(conv, 5, scheme="spatial"), x2, {"Conv"}),
        ("svd-input", SVDConv.from_dense(conv, 5, scheme="input"), x2, {"Conv", "MatMul"}),
        ("tucker", TuckerConv.from_dense(conv, (4, 6)), x2, {"Conv", "MatMul", "Add"}),
        ("tucker-1d", TuckerConv.from_dense(conv1d, (3, 4)), x1, {"Conv", "MatMul", "Add"}),
        ("cp", CPConv.from_dense(grouped, 4, n_iter_max=20), x2, {"Conv"}),
        ("cp-1d", CPConv.from_dense(conv1d, 4, n_iter_max=20), x1, {"Conv", "MatMul", "Add"}),
        ("svd-reflect", SVDConv.from_dense(reflect, 5), x2, {"Conv", "Pad", "MatMul", "Add"}),
        ("tt", TTLinear.from_dense(linear, 4), (3, 48), {"MatMul", "Add"}),
    ]


with warnings.catch_warnings():  # a few CP sweeps are enough for an export test
    warnings.simplefilter("ignore")
    CASES = _cases()


def _export(module, x) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buf.getvalue()


@pytest.mark.parametrize("name,module,shape,compute_ops", CASES, ids=[c[0] for c in CASES])
def test_onnx_round_trip(name, module, shape, compute_ops):
    module.eval()
    x = torch.randn(*shape)
    data = _export(module, x)
    ops = {node.op_type for node in onnx.load_from_string(data).graph.node}
    arithmetic = ops - SHAPE_OPS
    assert arithmetic <= compute_ops | {"Pad"}, f"{name}: unexpected ops {sorted(arithmetic - compute_ops)}"
    assert arithmetic & {"Conv", "MatMul", "Gemm"}
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    for batch in (shape[0], 5):  # the batch axis stays dynamic
        xb = torch.randn(batch, *shape[1:])
        (y,) = session.run(None, {"x": xb.numpy()})
        with torch.no_grad():
            expected = module(xb).numpy()
        assert y.shape == expected.shape
        assert np.abs(y - expected).max() <= 1e-4


@pytest.mark.parametrize("name,module,shape,compute_ops", CASES, ids=[c[0] for c in CASES])
def test_torchscript_script_and_trace(name, module, shape, compute_ops):
    module.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = module(x)
        scripted = torch.jit.script(module)
        traced = torch.jit.trace(module, x)
        assert (scripted(x) - expected).abs().max() <= 1e-6
        assert (traced(x) - expected).abs().max() <= 1e-6
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-6
