"""Property tests of ``neusub.fusion`` against float64 ground truth from ``torch.nn.functional``.

Every conv-shaped helper is checked over groups (1, a middle value, depthwise), stride (1, 2),
dilation (1, 2) and odd, mostly rectangular kernels (1, 3, 5, 7 per axis) with "same" padding
``dilation * (k - 1) // 2`` per axis. The (groups, stride, dilation) grid is enumerated with
``pytest.mark.parametrize`` so that every combination is guaranteed to run; hypothesis draws the
rest (channels, kernel sizes, spatial size, batch, random seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from neusub import fusion
from neusub.reference import avg_pool, pad_with

TOL = 1e-12  # fp64: max |error| / max |ground truth|
TOL_FP32 = 1e-5
ODD = (1, 3, 5, 7)
GROUP_KINDS = ("one", "mid", "depthwise")
SETTINGS = settings(max_examples=25, deadline=None)

conv_grid = pytest.mark.parametrize(
    "kind, stride, dilation",
    [(kind, s, d) for kind in GROUP_KINDS for s in (1, 2) for d in (1, 2)],
)

# Worst relative error per check name; read it after an in-process ``pytest.main([...])`` run.
WORST: dict[str, float] = {}


# --------------------------------------------------------------------------- helpers


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = TOL, floor: float = 1e-2
) -> float:
    """``max|actual - expected| / max|expected| <= tol``.

    All inputs are O(1), so ``max|expected|`` is O(1) or more, except for the rare draw whose output
    is a single element that cancels to ~0; ``floor`` keeps such a draw from failing on rounding
    alone (it turns the bound into an absolute ``tol * floor``, still far below any real error).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    rel = err / scale
    WORST[name] = max(WORST.get(name, 0.0), rel)
    assert rel <= tol, f"{name}: relative max error {rel:.3e} > {tol:.0e}"
    return rel


def same(size: tuple[int, int], dilation: int) -> tuple[int, int]:
    return dilation * (size[0] - 1) // 2, dilation * (size[1] - 1) // 2


def conv(x, weight, bias, stride, dilation, groups, padding=None):
    if padding is None:
        padding = same(tuple(weight.shape[-2:]), dilation)
    return F.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


class Rand:
    """Seeded float64 random tensors (hypothesis draws the seed)."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64).to(self.dtype)

    def positive(self, *shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=self.gen, dtype=torch.float64) * 2 + 0.05).to(self.dtype)


@dataclass(frozen=True)
class Geometry:
    batch: int
    c_in: int
    c_out: int
    groups: int
    height: int
    width: int
    seed: int


@st.composite
def geometries(draw, kind: str, square: bool = False) -> Geometry:
    """Channels <= 8 with ``groups`` of the given kind; ``square`` forces ``c_out == c_in``."""
    if kind == "one":
        groups = 1
        c_in = draw(st.integers(1, 8))
        c_out = c_in if square else draw(st.integers(1, 8))
    elif kind == "mid":  # 1 < groups < c_in
        groups = draw(st.sampled_from((2, 3, 4)))
        c_in = groups * draw(st.integers(2, 8 // groups))
        c_out = c_in if square else groups * draw(st.integers(1, 8 // groups))
    else:  # depthwise: groups == c_in, channel multiplier for c_out
        groups = draw(st.integers(2, 8))
        c_in = groups
        c_out = c_in if square else groups * draw(st.integers(1, 8 // groups))
    return Geometry(
        batch=draw(st.integers(1, 2)),
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        height=draw(st.integers(1, 9)),
        width=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


kernel_sizes = st.tuples(st.sampled_from(ODD), st.sampled_from(ODD))


def smaller_odd(limit: int):
    return st.sampled_from([k for k in ODD if k <= limit])


def assert_centred(padded: torch.Tensor, small: torch.Tensor) -> None:
    kh, kw = small.shape[-2:]
    oh, ow = (padded.shape[-2] - kh) // 2, (padded.shape[-1] - kw) // 2
    assert torch.equal(padded[..., oh : oh + kh, ow : ow + kw], small)
    rest = padded.clone()
    rest[..., oh : oh + kh, ow : ow + kw] = 0
    assert torch.count_nonzero(rest) == 0


# --------------------------------------------------------------------------- bn_affine / folds


@SETTINGS
@given(
    channels=st.integers(1, 8),
    batch=st.integers(1, 2),
    spatial=st.booleans(),
    has_weight=st.booleans(),
    has_bias=st.booleans(),
    eps=st.sampled_from((0.0, 1e-5, 1e-3, 0.1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_bn_affine_matches_eval_batch_norm(channels, batch, spatial, has_weight, has_bias, eps, seed):
    r = Rand(seed)
    shape = (batch, channels, 3, 4) if spatial else (batch, channels)
    x = r.normal(*shape)
    mean, var = r.normal(channels), r.positive(channels)
    weight = r.normal(channels) if has_weight else None
    bias = r.normal(channels) if has_bias else None
    scale, shift = fusion.bn_affine(mean, var, weight, bias, eps)
    assert scale.shape == shift.shape == (channels,)
    view = (1, -1) + (1,) * (x.dim() - 2)
    expected = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
    assert_close(scale.reshape(view) * x + shift.reshape(view), expected, "bn_affine")


@conv_grid
@SETTINGS
@given(data=st.data())
def test_fold_conv_bn(kind, stride, dilation, data):
    geo = data.draw(geometries(kind))
    size = data.draw(kernel_sizes)
    has_bias, has_weight, has_bn_bias = data.draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    eps = data.draw(st.sampled_from((1e-5, 1e-3, 0.1)))
    r = Rand(geo.seed)
    x = r.normal(geo.batch, geo.c_in, geo.height, geo.width)
    kernel = r.normal(geo.c_out, geo.c_in // geo.groups, *size)
    bias = r.normal(geo.c_out) if has_bias else None
    mean, var = r.normal(geo.c_out), r.positive(geo.c_out)
    weight = r.normal(geo.c_out) if has_weight else None
    bn_bias = r.normal(geo.c_out) if has_bn_bias else None

    y = conv(x, kernel, bias, stride, dilation, geo.groups)
    expected = F.batch_norm(y, mean, var, weight, bn_bias, training=False, eps=eps)

    scale, shift = fusion.bn_affine(mean, var, weight, bn_bias, eps)
    fk, fb = fusion.fold_conv_bn(kernel, bias, scale, shift)
    assert fk.shape == kernel.shape and fb.shape == (geo.c_out,)
    assert_close(conv(x, fk, fb, stride, dilation, geo.groups), expected, "fold_conv_bn")


@SETTINGS
@given(
    batch=st.integers(1, 2),
    d_in=st.integers(1, 8),
    d_out=st.integers(1, 8),
    has_bias=st.booleans(),
    has_weight=st.booleans(),
    has_bn_bias=st.booleans(),
    eps=st.sampled_from((1e-5, 1e-3, 0.1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_fold_conv_bn_on_a_linear_weight(batch, d_in, d_out, has_bias, has_weight, has_bn_bias, eps, seed):
    r = Rand(seed)
    x = r.normal(batch, d_in)
    weight = r.normal(d_out, d_in)
    bias = r.normal(d_out) if has_bias else None
    mean, var = r.normal(d_out), r.positive(d_out)
    gamma = r.normal(d_out) if has_weight else None
    beta = r.normal(d_out) if has_bn_bias else None

    # BatchNorm1d in eval mode on the (B, D) output of the Linear.
    expected = F.batch_norm(F.linear(x, weight, bias), mean, var, gamma, beta, training=False, eps=eps)

    scale, shift = fusion.bn_affine(mean, var, gamma, beta, eps)
    fw, fb = fusion.fold_conv_bn(weight, bias, scale, shift)  # RepLinear's fold: a 2-D kernel
    assert fw.shape == weight.shape and fb.shape == (d_out,)
    assert_close(F.linear(x, fw, fb), expected, "fold_conv_bn (linear)")


# --------------------------------------------------------------------------- pad_kernel


@conv_grid
@SETTINGS
@given(data=st.data())
def test_pad_kernel_same_conv(kind, stride, dilation, data):
    geo = data.draw(geometries(kind))
    big = data.draw(kernel_sizes)
    small = (data.draw(smaller_odd(big[0])), data.draw(smaller_odd(big[1])))
    r = Rand(geo.seed)
    x = r.normal(geo.batch, geo.c_in, geo.height, geo.width)
    kernel = r.normal(geo.c_out, geo.c_in // geo.groups, *small)
    bias = r.normal(geo.c_out)

    padded = fusion.pad_kernel(kernel, big)
    assert padded.shape == (geo.c_out, geo.c_in // geo.groups, *big)
    assert_centred(padded, kernel)

    expected = conv(x, kernel, bias, stride, dilation, geo.groups)  # the small kernel's own padding
    actual = conv(x, padded, bias, stride, dilation, geo.groups)  # the big kernel's padding
    assert_close(actual, expected, "pad_kernel")


@pytest.mark.parametrize(
    "small, big",
    [
        ((1, 1), (3, 3)),
        ((1, 3), (3, 3)),
        ((3, 1), (3, 3)),
        ((3, 1), (5, 5)),
        ((1, 5), (7, 7)),
        ((3, 5), (7, 5)),
    ],
)
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_pad_kernel_named_cases(small, big, groups, stride, dilation):
    r = Rand(hash((small, big, groups, stride, dilation)) % 2**31)
    x = r.normal(2, 4, 9, 8)
    kernel = r.normal(4, 4 // groups, *small)
    padded = fusion.pad_kernel(kernel, big)
    assert_centred(padded, kernel)
    assert_close(
        conv(x, padded, None, stride, dilation, groups),
        conv(x, kernel, None, stride, dilation, groups),
        "pad_kernel",
    )


@SETTINGS
@given(
    kernel_size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
)
def test_pad_kernel_validates_sizes(kernel_size, size):
    kernel = torch.ones(2, 1, *kernel_size, dtype=torch.float64)
    diffs = (size[0] - kernel_size[0], size[1] - kernel_size[1])
    if all(d >= 0 and d % 2 == 0 for d in diffs):
        padded = fusion.pad_kernel(kernel, size)
        assert padded.shape == (2, 1, *size)
        assert_centred(padded, kernel)
    else:
        with pytest.raises(ValueError):
            fusion.pad_kernel(kernel, size)


@pytest.mark.parametrize(
    "kernel_size, size",
    [
        ((3, 3), (4, 4)),
        ((1, 3), (3, 4)),
        ((1, 1), (2, 3)),
        ((5, 5), (3, 3)),
        ((3, 5), (5, 3)),
        ((3, 3), (1, 5)),
    ],
)
def test_pad_kernel_rejects_odd_or_negative(kernel_size, size):
    with pytest.raises(ValueError):
        fusion.pad_kernel(torch.ones(1, 1, *kernel_size), size)


# --------------------------------------------------------------------------- sum_branches


@conv_grid
@SETTINGS
@given(data=st.data())
def test_sum_branches(kind, stride, dilation, data):
    geo = data.draw(geometries(kind))
    big = data.draw(kernel_sizes)
    n = data.draw(st.integers(1, 4))
    smalls = [(data.draw(smaller_odd(big[0])), data.draw(smaller_odd(big[1]))) for _ in range(n)]
    r = Rand(geo.seed)
    x = r.normal(geo.batch, geo.c_in, geo.height, geo.width)
    branches = [(r.normal(geo.c_out, geo.c_in // geo.groups, *s), r.normal(geo.c_out)) for s in smalls]

    expected = sum(conv(x, k, b, stride, dilation, geo.groups) for k, b in branches)
    fk, fb = fusion.sum_branches([(fusion.pad_kernel(k, big), b) for k, b in branches])
    assert fk.shape == (geo.c_out, geo.c_in // geo.groups, *big) and fb.shape == (geo.c_out,)
    assert_close(conv(x, fk, fb, stride, dilation, geo.groups), expected, "sum_branches")


# --------------------------------------------------------------------------- identity / scale / avg


@conv_grid
@SETTINGS
@given(data=st.data())
def test_identity_kernel(kind, stride, dilation, data):
    geo = data.draw(geometries(kind, square=True))
    size = data.draw(kernel_sizes)
    x = Rand(geo.seed).normal(geo.batch, geo.c_in, geo.height, geo.width)
    kernel = fusion.identity_kernel(geo.c_in, geo.groups, size, like=x)
    assert kernel.shape == (geo.c_in, geo.c_in // geo.groups, *size)
    expected = x[:, :, ::stride, ::stride]
    assert_close(conv(x, kernel, None, stride, dilation, geo.groups), expected, "identity_kernel")


@conv_grid
@SETTINGS
@given(data=st.data())
def test_avg_pool_kernel(kind, stride, dilation, data):
    geo = data.draw(geometries(kind, square=True))
    size = data.draw(kernel_sizes)
    x = Rand(geo.seed).normal(geo.batch, geo.c_in, geo.height, geo.width)
    kernel = fusion.avg_pool_kernel(geo.c_in, geo.groups, size, like=x)
    assert kernel.shape == (geo.c_in, geo.c_in // geo.groups, *size)
    actual = conv(x, kernel, None, stride, dilation, geo.groups)

    padding = same(size, dilation)
    assert_close(actual, avg_pool(x, size, stride, padding, dilation), "avg_pool_kernel")
    if dilation == 1:  # F.avg_pool2d has no dilation
        expected = F.avg_pool2d(x, size, stride, padding=padding, count_include_pad=True)
        assert_close(actual, expected, "avg_pool_kernel")


# --------------------------------------------------------------------------- grouped <-> dense


# --------------------------------------------------------------------------- merge_1x1_kxk


def literal_1x1_then(x, first, stride, dilation, groups, size, second_op):
    """conv1x1 + b1, BN-and-pad with b1 by the k×k's same padding, then ``second_op`` (padding 0)."""
    k1, b1 = first
    y = F.conv2d(x, k1, b1, groups=groups)
    return second_op(pad_with(y, b1, same(size, dilation)))


@conv_grid
@SETTINGS
@given(data=st.data())
def test_merge_1x1_kxk(kind, stride, dilation, data):
    geo = data.draw(geometries(kind))
    size = data.draw(kernel_sizes)
    mid = geo.c_in * data.draw(st.sampled_from((1, 2, 4)))
    r = Rand(geo.seed)
    x = r.normal(geo.batch, geo.c_in, geo.height, geo.width)
    first = (r.normal(mid, geo.c_in // geo.groups, 1, 1), r.normal(mid))
    second = (r.normal(geo.c_out, mid // geo.groups, *size), r.normal(geo.c_out))

    def kxk(y):
        return conv(y, *second, stride, dilation, geo.groups, padding=0)

    expected = literal_1x1_then(x, first, stride, dilation, geo.groups, size, kxk)
    mk, mb = fusion.merge_1x1_kxk(first, second, geo.groups)
    assert mk.shape == (geo.c_out, geo.c_in // geo.groups, *size) and mb.shape == (geo.c_out,)
    assert_close(conv(x, mk, mb, stride, dilation, geo.groups), expected, "merge_1x1_kxk")


@conv_grid
@SETTINGS
@given(data=st.data())
def test_merge_1x1_avg_pool(kind, stride, dilation, data):
    geo = data.draw(geometries(kind))
    size = data.draw(kernel_sizes)
    mid = geo.c_in * data.draw(st.sampled_from((1, 2, 4)))
    r = Rand(geo.seed)
    x = r.normal(geo.batch, geo.c_in, geo.height, geo.width)
    first = (r.normal(mid, geo.c_in // geo.groups, 1, 1), r.normal(mid))
    b2 = r.normal(mid)
    second = (fusion.avg_pool_kernel(mid, geo.groups, size, like=x), b2)

    def avg(y):
        if dilation == 1:
            pooled = F.avg_pool2d(y, size, stride, padding=0)
        else:
            pooled = avg_pool(y, size, stride, (0, 0), dilation)
        return pooled + b2.reshape(1, -1, 1, 1)

    expected = literal_1x1_then(x, first, stride, dilation, geo.groups, size, avg)
    mk, mb = fusion.merge_1x1_kxk(first, second, geo.groups)
    assert mk.shape == (mid, geo.c_in // geo.groups, *size) and mb.shape == (mid,)
    assert_close(conv(x, mk, mb, stride, dilation, geo.groups), expected, "merge_1x1_avg_pool")


# --------------------------------------------------------------------------- dtype / device


def run_every_helper(geo: Geometry, size: tuple[int, int], mid: int, dtype, device) -> dict:
    """Call every function of ``fusion`` on inputs of ``dtype`` / ``device``."""
    r = Rand(geo.seed, dtype)
    g, c_in, c_out = geo.groups, geo.c_in, geo.c_out

    def t(*shape, positive=False):
        return (r.positive(*shape) if positive else r.normal(*shape)).to(device)

    x = t(geo.batch, c_in, geo.height, geo.width)
    kernel = t(c_out, c_in // g, *size)
    scale, shift = fusion.bn_affine(t(c_out), t(c_out, positive=True), t(c_out), t(c_out), 1e-5)
    bare_scale, bare_shift = fusion.bn_affine(t(c_out), t(c_out, positive=True), None, None, 1e-5)
    out = {
        "bn_affine.scale": scale,
        "bn_affine.shift": shift,
        "bn_affine(None).scale": bare_scale,
        "bn_affine(None).shift": bare_shift,
    }
    out["fold_conv_bn.kernel"], out["fold_conv_bn.bias"] = fusion.fold_conv_bn(kernel, t(c_out), scale, shift)
    _, out["fold_conv_bn(None).bias"] = fusion.fold_conv_bn(kernel, None, scale, shift)
    out["fold_conv_bn(linear).weight"], out["fold_conv_bn(linear).bias"] = fusion.fold_conv_bn(
        t(c_out, c_in), t(c_out), scale, shift
    )
    out["pad_kernel"] = fusion.pad_kernel(t(c_out, c_in // g, 1, 1), size)
    out["sum_branches.kernel"], out["sum_branches.bias"] = fusion.sum_branches(
        [(kernel, t(c_out)), (out["pad_kernel"], t(c_out))]
    )
    out["identity_kernel"] = fusion.identity_kernel(c_in, g, size, like=x)
    out["avg_pool_kernel"] = fusion.avg_pool_kernel(c_in, g, size, like=x)
    first = (t(mid, c_in // g, 1, 1), t(mid))
    out["merge_1x1_kxk.kernel"], out["merge_1x1_kxk.bias"] = fusion.merge_1x1_kxk(
        first, (t(c_out, mid // g, *size), t(c_out)), g
    )
    out["merge_1x1_avg.kernel"], out["merge_1x1_avg.bias"] = fusion.merge_1x1_kxk(
        first, (fusion.avg_pool_kernel(mid, g, size, like=x), t(mid)), g
    )
    return out


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", GROUP_KINDS)
@SETTINGS
@given(data=st.data())
def test_helpers_keep_dtype_and_device(dtype, device, kind, data):
    geo = data.draw(geometries(kind))
    size = data.draw(kernel_sizes)
    mid = geo.c_in * data.draw(st.sampled_from((1, 2, 4)))
    # The default dtype is set to the one *not* under test, so a helper that ignores its input's
    # dtype (``torch.zeros(...)`` without ``dtype=``) is caught in both directions.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == torch.float32 else torch.float32)
    try:
        outputs = run_every_helper(geo, size, mid, dtype, device)
    finally:
        torch.set_default_dtype(previous)
    for name, tensor in outputs.items():
        assert tensor.dtype == dtype, f"{name}: {tensor.dtype} != {dtype}"
        assert tensor.device.type == device, f"{name}: on {tensor.device}, not {device}"
    if dtype == torch.float32 and device != "meta":
        # Same inputs (float64 draws rounded to float32): the fp32 result is close to the fp64 one.
        reference = run_every_helper(geo, size, mid, torch.float64, device)
        for name, tensor in outputs.items():
            assert_close(tensor.double(), reference[name], f"fp32 {name}", tol=TOL_FP32, floor=1.0)
