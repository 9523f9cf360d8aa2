"""SVDConv (channel/spatial), TuckerConv and CPConv: exactness, errors, counts, training, bad options."""

import io

import pytest
import torch

from tensorfold.errors import InvalidArgumentError, NotCompressibleError, RankError, ShapeError
from tensorfold.nn import CPConv, LayerCost, SVDConv, TuckerConv, dense_flops, dense_params, layer_class_for
from tensorfold.testing import random_cp

CONVS = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}

# (dim, kernel, stride, padding, dilation, groups, bias, padding_mode): a small grid touching every option
GRID = [
    (2, 3, 1, 1, 1, 1, True, "zeros"),
    (2, 3, 2, 1, 1, 1, False, "zeros"),
    (2, 1, 1, 0, 1, 1, True, "zeros"),
    (2, (3, 5), (2, 1), (1, 2), (1, 2), 1, True, "zeros"),
    (2, 3, 1, "same", 2, 2, True, "zeros"),
    (2, 4, 1, "same", 1, 1, False, "zeros"),
    (2, 3, 1, "valid", 1, 4, True, "zeros"),
    (2, 3, 2, 2, 2, 2, True, "reflect"),
    (2, 3, 1, 1, 1, 1, False, "circular"),
    (2, 5, 3, 2, 1, 1, True, "replicate"),
    (1, 3, 1, 1, 1, 1, True, "zeros"),
    (1, 5, 2, 2, 2, 2, False, "reflect"),
    (1, 4, 1, "same", 1, 1, True, "circular"),
    (1, 1, 1, 0, 1, 4, True, "zeros"),
]


def _conv(cfg, c_in=8, c_out=12, dtype=torch.float32, seed=0):
    dim, k, s, p, d, g, b, mode = cfg
    torch.manual_seed(seed)
    return CONVS[dim](c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, bias=b, padding_mode=mode,
                      dtype=dtype)


def _input(conv, dtype=torch.float32, batch=2, size=11):
    dim = conv.weight.ndim - 2
    return torch.randn(batch, conv.in_channels, *([size] * dim), generator=torch.Generator().manual_seed(1),
                       dtype=dtype)


def _methods(conv):
    out = [(SVDConv, {"scheme": "channel"}), (SVDConv, {"scheme": "input"}), (TuckerConv, {})]
    if conv.weight.ndim == 4 and min(conv.kernel_size) > 1:
        out.append((SVDConv, {"scheme": "spatial"}))
    return out


@pytest.mark.parametrize("cfg", GRID, ids=[str(i) for i in range(len(GRID))])
def test_full_rank_equals_dense(cfg):
    dense = _conv(cfg)
    x = _input(dense)
    y = dense(x)
    for cls, opts in _methods(dense):
        layer = cls.from_dense(dense, cls.max_rank(dense, **opts), **opts)
        assert layer(x).shape == y.shape
        assert (layer(x) - y).abs().max() <= 1e-5, (cls.__name__, opts)
        assert (layer(x[0]) - y[0]).abs().max() <= 1e-5  # unbatched input
        strided = x.transpose(1, -1).contiguous().transpose(1, -1)  # same values, channels-last storage
        assert (layer(strided) - y).abs().max() <= 1e-5
        back = layer.to_dense()
        assert type(back) is type(dense)
        assert (back(x) - y).abs().max() <= 1e-5
        # the counted cost is the cost of the layer actually built
        assert layer.n_params == cls.cost(dense, layer.rank, tuple(x.shape), **opts).params


@pytest.mark.parametrize("cfg", GRID[:3] + GRID[7:9] + GRID[10:12], ids=str)
def test_cp_layer_is_exact_for_cp_kernels(cfg):
    dense = _conv(cfg, dtype=torch.float64)
    dim, k = cfg[0], dense.kernel_size
    g = dense.groups
    cps = [random_cp((12 // g, 8 // g, *k), 3, seed=i) for i in range(g)]
    with torch.no_grad():
        dense.weight.copy_(torch.cat([c.to_tensor() for c in cps]))
    layer = CPConv.from_cp(dense, cps)
    x = _input(dense, torch.float64)
    assert (layer(x) - dense(x)).abs().max() <= 1e-10
    assert (layer.dense_weight() - dense.weight).abs().max() <= 1e-12
    assert len(layer.spatial) == dim


def test_cp_from_dense_recovers_a_cp_kernel():
    dense = torch.nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(random_cp((12, 8, 3, 3), 3, seed=4).to_tensor())
    layer = CPConv.from_dense(dense, 3)
    rel = (layer.dense_weight() - dense.weight).norm() / dense.weight.norm()
    assert rel < 1e-5
    x = _input(dense, torch.float64)
    assert (layer(x) - dense(x)).abs().max() < 1e-5


@pytest.mark.parametrize("scheme", ["channel", "input", "spatial"])
def test_svd_error_is_eckart_young_tail(scheme):
    dense = torch.nn.Conv2d(6, 8, 3, groups=2, dtype=torch.float64)
    W = dense.weight.detach()
    blocks = W.chunk(2)
    if scheme == "channel":
        mats = [B.reshape(4, -1) for B in blocks]
    elif scheme == "input":
        mats = [B.permute(0, 2, 3, 1).reshape(4 * 9, 3) for B in blocks]
    else:
        mats = [B.permute(1, 2, 0, 3).reshape(3 * 3, 4 * 3) for B in blocks]
    spectra = [torch.linalg.svdvals(M) for M in mats]
    errors = []
    for r in range(1, SVDConv.max_rank(dense, scheme=scheme) + 1):
        layer = SVDConv.from_dense(dense, r, scheme=scheme)
        err_sq = float(((layer.dense_weight().detach() - W) ** 2).sum())
        assert err_sq == pytest.approx(sum(float((S[r:] ** 2).sum()) for S in spectra), rel=1e-9, abs=1e-20)
        errors.append(err_sq)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-20


def test_tucker_error_non_increasing_and_hooi_no_worse():
    dense = torch.nn.Conv2d(10, 12, 3, dtype=torch.float64)
    W = dense.weight.detach()
    errors = []
    for r in range(1, 11):
        hosvd = float((TuckerConv.from_dense(dense, (r, r)).dense_weight() - W).norm())
        hooi = float((TuckerConv.from_dense(dense, (r, r), n_iter=3).dense_weight() - W).norm())
        assert hooi <= hosvd + 1e-12
        errors.append(hosvd)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert float((TuckerConv.from_dense(dense, (10, 12)).dense_weight() - W).norm()) < 1e-12


@pytest.mark.filterwarnings("ignore::tensorfold.errors.ConvergenceWarning")
def test_cp_error_decreases_with_rank():
    dense = torch.nn.Conv2d(4, 5, 3, dtype=torch.float64)
    W = dense.weight.detach()
    errs = [float((CPConv.from_dense(dense, r, n_iter_max=15).dense_weight().detach() - W).norm()) for r in (1, 4, 12)]
    assert errs[0] > errs[1] > errs[2]


# ---- hand-computed counts: ResNet-18's 3x3 convs at 224x224 input (bias-free) ----------------------

# (in, out, stride, input side) -> dense multiply-adds, computed by hand as out_side^2 * out * in * 9
RESNET18_3X3 = [
    ((64, 64, 1, 56), 115605504),   # 56*56 * 64*64*9
    ((64, 128, 2, 56), 57802752),   # 28*28 * 128*64*9
    ((128, 128, 1, 28), 115605504),
    ((128, 256, 2, 28), 57802752),  # 14*14 * 256*128*9
    ((256, 256, 1, 14), 115605504),
    ((256, 512, 2, 14), 57802752),  # 7*7 * 512*256*9
    ((512, 512, 1, 7), 115605504),
]


@pytest.mark.parametrize("shape,flops", RESNET18_3X3)
def test_resnet18_dense_counts(shape, flops):
    c_in, c_out, stride, side = shape
    conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    assert dense_flops(conv, (1, c_in, side, side)) == flops
    assert dense_flops(conv, (8, c_in, side, side)) == 8 * flops
    assert dense_params(conv) == c_out * c_in * 9


def test_resnet18_factored_counts():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    shape = (1, 64, 56, 56)
    # channel SVD r=16: 3136 * 16 * (64*9 + 64)
    assert SVDConv.cost(conv, 16, shape) == LayerCost(params=16 * 576 + 64 * 16, flops=32112640)
    # spatial SVD r=24: 3136 * 24*64*3 twice
    assert SVDConv.cost(conv, 24, shape, scheme="spatial") == LayerCost(params=24 * 64 * 3 * 2, flops=28901376)
    # input SVD r=16: 3136 * (64*16 + 16*64*9)
    assert SVDConv.cost(conv, 16, shape, scheme="input") == LayerCost(params=64 * 16 + 64 * 16 * 9, flops=32112640)
    # Tucker (16, 16): 3136 * (64*16 + 16*16*9 + 16*64)
    assert TuckerConv.cost(conv, (16, 16), shape) == LayerCost(params=4352, flops=13647872)
    # CP r=32: 3136 * (64*32 + 32*3 + 32*3 + 32*64)
    assert CPConv.cost(conv, 32, shape) == LayerCost(params=4288, flops=13447168)
    strided = torch.nn.Conv2d(128, 256, 3, stride=2, padding=1, bias=False)
    shape = (1, 128, 28, 28)
    # Tucker (32, 64): 1x1 at 28x28 input, core and 1x1 at 14x14 output
    assert TuckerConv.cost(strided, (32, 64), shape).flops == 784 * 128 * 32 + 196 * 64 * 32 * 9 + 196 * 64 * 256
    assert TuckerConv.cost(strided, (32, 64), shape).flops == 10035200
    # spatial SVD r=32: 3x1 stride (2,1) gives 14x28, then 1x3 stride (1,2) gives 14x14
    assert SVDConv.cost(strided, 32, shape, scheme="spatial").flops == 9633792
    built = SVDConv(strided, 32, scheme="spatial")
    assert built.flops(shape) == 9633792 and built.n_params == 32 * 128 * 3 + 256 * 32 * 3
    # input SVD r=32: the 1x1 runs at the 28x28 input, the 3x3 at the 14x14 output
    assert SVDConv.cost(strided, 32, shape, scheme="input").flops == 784 * 128 * 32 + 196 * 32 * 256 * 9
    assert SVDConv(strided, 32, scheme="input").n_params == 128 * 32 + 256 * 32 * 9


def test_fraction_of_params():
    conv = torch.nn.Conv2d(64, 128, 3, bias=False)
    budget = 0.3 * dense_params(conv)
    for cls in (SVDConv, TuckerConv, CPConv):
        r = cls.resolve_rank(conv, 0.3)
        assert cls.cost(conv, r, (1, 64, 8, 8)).params <= budget
    r_in, r_out = TuckerConv.resolve_rank(conv, 0.3)
    assert r_out == pytest.approx(2 * r_in, abs=1)  # ranks keep the 64:128 aspect
    assert SVDConv.resolve_rank(conv, 0.3) == 31  # 0.3 * 73728 // (576 + 128)


@pytest.mark.filterwarnings("ignore::tensorfold.errors.ConvergenceWarning")
def test_gradients_flow_and_state_dict_round_trip():
    dense = _conv(GRID[7])
    x = _input(dense)
    for cls, opts in _methods(dense) + [(CPConv, {})]:
        fit = {"n_iter_max": 20} if cls is CPConv else {}
        layer = cls.from_dense(dense, 2, **opts, **fit)
        layer(x).pow(2).sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (cls.__name__, name)
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        buf.seek(0)
        fresh = cls(dense, layer.rank, **opts)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.equal(fresh(x), layer(x))
        assert f"rank={layer.rank}" in repr(layer) and "padding_mode='reflect'" in repr(layer)


def test_dtype_preserved_and_input_untouched():
    dense = _conv(GRID[0], dtype=torch.float64)
    before = dense.weight.detach().clone()
    for cls, opts in _methods(dense):
        layer = cls.from_dense(dense, 3, **opts)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert torch.equal(dense.weight, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_preserved_on_cuda():
    dense = _conv(GRID[0]).cuda()
    x = _input(dense).cuda()
    for cls, opts in _methods(dense):
        layer = cls.from_dense(dense, cls.max_rank(dense, **opts), **opts)
        assert all(p.device.type == "cuda" for p in layer.parameters())
        assert (layer(x) - dense(x)).abs().max() <= 1e-4


def test_layer_class_for_convs():
    conv = torch.nn.Conv2d(8, 8, 3)
    assert layer_class_for("svd", conv) == (SVDConv, {"scheme": "channel"})
    assert layer_class_for("spatial", conv) == (SVDConv, {"scheme": "spatial"})
    assert layer_class_for("svd-input", conv) == (SVDConv, {"scheme": "input"})
    assert layer_class_for("tucker", conv) == (TuckerConv, {})
    assert layer_class_for("cp", conv) == (CPConv, {})
    assert layer_class_for("tt", conv) is None
    assert layer_class_for("spatial", torch.nn.Conv1d(8, 8, 3)) is None
    assert layer_class_for("spatial", torch.nn.Conv2d(8, 8, 1)) is None


def test_bad_options_raise():
    conv = torch.nn.Conv2d(8, 12, 3)
    for rank in (0, -2, 73, 1.0, 0.0, 2.5):
        with pytest.raises(RankError):
            SVDConv.from_dense(conv, rank)
    with pytest.raises(RankError):
        TuckerConv.from_dense(conv, (9, 4))  # r_in above in_channels
    with pytest.raises(RankError):
        TuckerConv.from_dense(conv, (2, 2, 2))
    with pytest.raises(RankError):
        TuckerConv.from_dense(conv, 13)
    with pytest.raises(RankError):
        CPConv.from_dense(conv, 0)
    with pytest.raises(InvalidArgumentError, match="scheme"):
        SVDConv.from_dense(conv, 2, scheme="diagonal")
    with pytest.raises(InvalidArgumentError, match="n_iter"):
        TuckerConv.from_dense(conv, 2, n_iter=-1)
    with pytest.raises(NotCompressibleError, match="spatial"):
        SVDConv.from_dense(torch.nn.Conv1d(8, 8, 3), 2, scheme="spatial")
    with pytest.raises(NotCompressibleError, match="ConvTranspose2d"):
        TuckerConv.from_dense(torch.nn.ConvTranspose2d(8, 8, 3), 2)
    with pytest.raises(NotCompressibleError, match="Linear"):
        CPConv.from_dense(torch.nn.Linear(8, 8), 2)
    with pytest.raises(NotCompressibleError, match="BatchNorm2d"):
        SVDConv.from_dense(torch.nn.BatchNorm2d(8), 2)
    with pytest.raises(ShapeError):
        SVDConv.from_factors(conv, [torch.ones(4, 8, 3, 3), torch.ones(12, 5, 1, 1)], torch.zeros(12))
    with pytest.raises(ShapeError, match="bias"):
        SVDConv.from_factors(conv, [torch.ones(4, 8, 3, 3), torch.ones(12, 4, 1, 1)], None)
    with pytest.raises(ShapeError):
        dense_flops(conv, (1, 7, 10, 10))
    with pytest.raises(ShapeError, match="too small"):
        dense_flops(conv, (1, 8, 2, 2))


@pytest.mark.parametrize("size", [10, 40])  # below and above the size where NCHW input leaves the oneDNN chain
@pytest.mark.parametrize("channels_last", [False, True])
def test_both_forward_paths_are_exact_keep_the_layout_and_train(size, channels_last):
    conv = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for cls, opts in _methods(conv):
        layer = cls.from_dense(conv, cls.max_rank(conv, **opts), **opts)
        x = torch.randn(3, 8, size, size, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        y = layer(x)
        assert (y - conv(x)).abs().max() < 1e-10, (cls.__name__, opts)
        assert y.is_contiguous(memory_format=fmt)
        y.square().sum().backward()
        assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
