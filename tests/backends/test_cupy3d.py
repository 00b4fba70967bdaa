"""The cupy backend's 3-D primitives (kernels/cuda/vol.cu, kernels/cupy_vol.py) and the primitives a 3-D
U-Net uses on 5-D arrays, against the numpy reference; then whole small 3-D networks against the numpy
backend.

Same fixture as tests/backends/test_cupy.py (imported from there): every test runs on "cupy" (a GPU;
skipped without one) and on "emulated" (the same Python code and .cu sources on the CPU, the .cu files
compiled by g++ and run with their real thread blocks; tests/backends/cuda_emulation.py).

Tolerances (test_cupy.TOL; relative error: max |got - want| / max |want|): float32 1e-4, float64 1e-10.
Whole networks: a parameter gradient is judged against at least 1% of the largest gradient (a
convolution's bias before batch-norm has a gradient that is zero up to rounding; see test_cupy).
"""
import collections
import os
import shutil

import numpy as np
import pytest

import unet_np
from unet_np import backends
from unet_np.backends import cupy_backend as cb
from unet_np.kernels.cupy_vol import vol_tiles

from tests.backends import cuda_emulation as emu
from tests.backends.test_cupy import (  # noqa: F401 (xb: the fixture)
    DTYPES, REF, TOL, check_forward_backward, close, counting, rng_for, xb)


def _kernels(xb, **attrs):
    """A fresh CudaKernels over the backend's kernels, with attributes set (vol_tile_elements, ...)."""
    k = cb.CudaKernels(xb.xp, xb.k._get)
    for name, value in attrs.items():
        setattr(k, name, value)
    return k


def test_table_replaces_every_3d_primitive(xb):
    for op in ("conv3d", "conv_transpose3d", "maxpool3d", "pad3d", "upsample_trilinear3d", "upsample_nearest3d"):
        for way in ("forward", "backward"):
            name = f"{op}_{way}"
            assert name in cb.REPLACED
            assert xb.backend.ops[name] == getattr(xb.k, name), f"{name} is not the kernel's (a host fallback?)"
    assert "conv3d_relu" in xb.backend.fused


def test_vol_tiles():
    assert vol_tiles(2, 5, 10, 100) == [(0, 2, 0, 5)]                        # all fits
    assert vol_tiles(3, 5, 10, 100) == [(0, 2, 0, 5), (2, 3, 0, 5)]          # two samples a tile
    assert vol_tiles(2, 5, 10, 25) == [(0, 1, 0, 2), (0, 1, 2, 4), (0, 1, 4, 5),
                                       (1, 2, 0, 2), (1, 2, 2, 4), (1, 2, 4, 5)]
    assert vol_tiles(1, 3, 10, 1) == [(0, 1, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3)]   # at least a slice


# ---------------------------------------------------------------------------------------------------
# Convolutions: whole buffer, one sample a tile, one output depth slice a tile
# ---------------------------------------------------------------------------------------------------
TILINGS = ("whole", "samples", "slices")

CONV3D_CASES = [
    # (N, C, (D, H, W), O, kernel, stride, padding, dilation, bias)
    (2, 3, (5, 6, 4), 4, (3, 3, 3), 1, 1, 1, True),                          # the U-Net's 3x3x3 'same'
    (2, 3, (4, 5, 3), 2, (1, 1, 1), 1, 0, 1, True),                          # 1x1x1: batched GEMM
    (1, 2, (5, 6, 5), 3, (1, 3, 3), 1, (0, 1, 1), 1, False),                 # anisotropic kernel
    (2, 2, (7, 8, 6), 3, (3, 2, 3), (2, 1, 3), ((1, 0), (0, 2), 1), (1, 2, 1), True),   # everything odd
    (1, 2, (5, 5, 5), 2, (2, 2, 2), 3, 0, 1, True),                          # stride > kernel: gaps
    (2, 1, (1, 1, 1), 2, (3, 3, 3), 1, 1, 1, True),                          # 1x1x1 volume, padded
    (1, 3, (4, 4, 5), 2, (1, 1, 1), 2, 0, 1, True),                          # 1x1x1 with stride: cols
]

CONVT3D_CASES = [
    # (N, Cin, (D, H, W), Cout, kernel, stride, padding, output_padding, dilation, bias)
    (2, 4, (3, 4, 3), 3, (2, 2, 2), 2, 0, 0, 1, True),                       # the U-Net's up-convolution
    (1, 3, (3, 3, 4), 2, (3, 3, 3), 1, 1, 0, 1, True),
    (1, 2, (3, 4, 3), 2, (3, 2, 3), (2, 1, 2), (1, 0, (1, 0)), (1, 0, 1), (2, 1, 1), False),
    (2, 2, (2, 3, 4), 3, (1, 1, 1), 1, 0, 0, 1, True),                       # 1x1x1 path
    (1, 2, (2, 2, 3), 2, (1, 3, 3), (1, 2, 2), (0, 1, 1), (0, 1, 0), 1, True),   # anisotropic
]


def _tiled(xb, tiling, per_sample):
    """CudaKernels whose column tiles are the whole batch, one sample (per_sample: the values of one
    sample's column buffer) or one output depth slice of one sample."""
    budget = {"whole": cb.CudaKernels.vol_tile_elements, "samples": per_sample, "slices": 1}[tiling]
    return _kernels(xb, vol_tile_elements=budget)


def conv_operands(tag, case, dtype, transposed=False):
    """The random operands of a conv case (N, C, size, O, kernel, ..., bias), from rng_for(tag, case, dtype):
    rng, x (N, C) + size, w (O, C) + kernel ((C, O) + kernel if transposed), b (O,) or None."""
    N, C, size, O, kernel, *_, bias = case
    rng = rng_for(tag, case, dtype)
    x = rng.standard_normal((N, C) + size).astype(dtype)
    w = rng.standard_normal(((C, O) if transposed else (O, C)) + kernel).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    return rng, x, w, b


def _check_conv3d(xb, op, case, dtype, tiling):
    N, C, size, O, kernel, *hyper, bias = case
    transposed = op == "conv_transpose3d"
    rng, x, w, b = conv_operands(op, case, dtype, transposed)
    y_ref, c_ref = REF[f"{op}_forward"](x, w, b, *hyper)
    grid = size if transposed else y_ref.shape[2:]                 # the columns' window grid
    per_sample = (O if transposed else C) * int(np.prod(kernel)) * int(np.prod(grid))
    k = _tiled(xb, tiling, per_sample)
    y, c = getattr(k, f"{op}_forward")(xb.put(x), xb.put(w), xb.put(b), *hyper)
    close(y, y_ref, f"y {case}")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    ref = REF[f"{op}_backward"](dy, c_ref)
    got = getattr(k, f"{op}_backward")(xb.put(dy), c)
    for name, g, r in zip(("dx", "dw", "db"), got, ref):
        if r is None:
            assert g is None
        else:
            close(g, r, f"{name} {case}")
    return k, (x, w, b, hyper, dy)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV3D_CASES)
def test_conv3d(xb, case, dtype, tiling):
    _check_conv3d(xb, "conv3d", case, dtype, tiling)


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVT3D_CASES)
def test_conv_transpose3d(xb, case, dtype, tiling):
    _check_conv3d(xb, "conv_transpose3d", case, dtype, tiling)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV3D_CASES[:4])
def test_conv3d_backward_without_input_grad(xb, case, dtype):
    """input_grad=False: dx is None, dw and db those of input_grad=True, and fewer GEMMs + launches."""
    N, C, size, O, kernel, stride, padding, dilation, bias = case
    backend, xp, launches = counting(xb)
    k = backend.kernels
    rng, x, w, b = conv_operands("conv3d-no-dx", case, dtype)
    y_ref, c_ref = REF["conv3d_forward"](x, w, b, stride, padding, dilation)
    _, c = k.conv3d_forward(xb.put(x), xb.put(w), xb.put(b), stride, padding, dilation)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    work, results = [], []
    for input_grad in (True, False):
        xp.matmuls = 0
        launches.clear()
        results.append(k.conv3d_backward(xb.put(dy), c, input_grad=input_grad))
        work.append(xp.matmuls + sum(launches.values()))
    (_, dw_full, _), (dx, dw, db) = results
    _, dw_ref, db_ref = REF["conv3d_backward"](dy, c_ref, input_grad=False)
    assert dx is None
    close(dw, dw_ref, "dw")
    np.testing.assert_array_equal(backends.to_numpy(dw), backends.to_numpy(dw_full))
    if bias:
        close(db, db_ref, "db")
    else:
        assert db is None
    assert work[1] < work[0], f"GEMMs + kernel launches: {work[0]} with dx, {work[1]} without"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CONV3D_CASES[0], CONV3D_CASES[1], CONV3D_CASES[3]])
def test_conv3d_fused_relu(xb, case, dtype):
    """conv3d_forward(activation='relu') = max(conv + b, 0) in the output pass (no ReLU kernel of its
    own); its backward = the reference's backward of dy * (y > 0)."""
    N, C, size, O, kernel, stride, padding, dilation, bias = case
    backend, _, launches = counting(xb)
    k = backend.kernels
    rng, x, w, b = conv_operands("conv3d-relu", case, dtype)
    z, c_ref = REF["conv3d_forward"](x, w, b, stride, padding, dilation)
    y, c = k.conv3d_forward(xb.put(x), xb.put(w), xb.put(b), stride, padding, dilation, activation="relu")
    assert not any(name.startswith("relu_fwd") for _, name in launches)
    close(y, np.maximum(z, 0), "relu(conv)")
    dy = rng.standard_normal(z.shape).astype(dtype)
    ref = REF["conv3d_backward"](dy * (z > 0), c_ref)
    for name, g, r in zip(("dx", "dw", "db"), k.conv3d_backward(xb.put(dy), c), ref):
        if r is None:
            assert g is None
        else:
            close(g, r, name)
    with pytest.raises(ValueError, match="activation"):
        k.conv3d_forward(xb.put(x), xb.put(w), xb.put(b), activation="sigmoid")


def test_conv3d_64bit_index_path():
    """vol.cu built with INDEX32_LIMIT=0 (every index 64-bit) gives the same results (the tests' small
    shapes otherwise always take the 32-bit path). On the CPU emulation only."""
    if os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("UNET_NP_EMULATION=0: the CPU emulation of the kernels is switched off")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulation of the CUDA kernels cannot be built")
    k = emu.emulated_kernels(defines={"vol": ("INDEX32_LIMIT=0",)})
    k.vol_tile_elements = 1
    rng = rng_for("conv3d-64")
    x = rng.standard_normal((2, 2, 5, 6, 4))
    w = rng.standard_normal((3, 2, 3, 2, 3))
    wt = rng.standard_normal((2, 3, 2, 2, 2))
    for op, weight, hyper in (("conv3d", w, ((2, 1, 1), (1, (0, 1), 1), (1, 2, 1))),
                              ("conv_transpose3d", wt, (2, 0, 0, 1))):
        y_ref, c_ref = REF[f"{op}_forward"](x, weight, None, *hyper)
        y, c = getattr(k, f"{op}_forward")(x, weight, None, *hyper)
        close(y, y_ref, f"{op}: y")
        dy = rng.standard_normal(y_ref.shape)
        for g, r in zip(getattr(k, f"{op}_backward")(dy, c)[:2], REF[f"{op}_backward"](dy, c_ref)[:2]):
            close(g, r, f"{op}: gradient")


# ---------------------------------------------------------------------------------------------------
# Max-pooling (small integers: ties, the first maximum must win), upsampling, padding, crop
# ---------------------------------------------------------------------------------------------------
POOL3D_CASES = [
    ((2, 3, 4, 6, 6), 2, 2, 0),
    ((1, 2, 5, 7, 6), 2, 2, 0),                                   # odd: the last slice / row dropped
    ((1, 2, 5, 6, 7), 3, 2, 1),                                   # overlapping, padded
    ((2, 1, 4, 5, 5), 3, 1, 1),                                   # stride 1: every voxel in 27 windows
    ((1, 2, 4, 6, 7), (1, 2, 3), (1, 2, 2), (0, 1, 1)),           # anisotropic
    ((1, 1, 5, 5, 5), 2, 3, 0),                                   # stride > kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL3D_CASES)
def test_maxpool3d(xb, case, dtype):
    shape, kernel, stride, padding = case
    rng = rng_for("pool3d", case, dtype)
    x = rng.integers(-2, 3, size=shape).astype(dtype)
    check_forward_backward(xb, "maxpool3d", x, rng, kernel, stride, padding)


UP3D_SHAPES = [((2, 3, 3, 4, 2), 2), ((1, 2, 2, 3, 3), (1, 2, 3)), ((1, 1, 1, 1, 1), 2), ((1, 2, 3, 2, 2), 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["trilinear", "trilinear-align", "nearest"])
@pytest.mark.parametrize("shape,scale", UP3D_SHAPES)
def test_upsample3d(xb, shape, scale, mode, dtype):
    rng = rng_for("up3d", shape, scale, mode, dtype)
    x = rng.standard_normal(shape).astype(dtype)
    op = "upsample_nearest3d" if mode == "nearest" else "upsample_trilinear3d"
    extra = () if mode == "nearest" else (mode == "trilinear-align",)
    check_forward_backward(xb, op, x, rng, scale, *extra)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,pads", [("reflect", (1, 2, 0, 3, 2, 1)), ("reflect", (5, 5, 4, 4, 3, 3)),
                                       ("reflect", (0, 0, 0, 0, 0, 0)), ("constant", (2, 0, 1, 3, 0, 2))])
def test_pad3d(xb, mode, pads, dtype):
    rng = rng_for("pad3d", mode, pads, dtype)
    x = rng.standard_normal((2, 2, 4, 5, 6)).astype(dtype)
    check_forward_backward(xb, "pad3d", x, rng, pads, mode, 0.5)


def test_pad3d_errors(xb):
    x = xb.put(np.zeros((1, 1, 3, 4, 5)))
    with pytest.raises(ValueError, match="mode must be one of"):
        xb.k.pad3d_forward(x, (1,) * 6, "circular")
    for pads in ((5, 0, 0, 0, 0, 0), (0, 0, 4, 0, 0, 0), (0, 0, 0, 0, 0, 3), (-1, 0, 0, 0, 0, 0)):
        with pytest.raises(ValueError, match="reflect padding"):
            xb.k.pad3d_forward(x, pads, "reflect")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(3, 4, 5), (4, 5, 6), (1, 2, 3), (5, 6)])
def test_center_crop3d(xb, size, dtype):
    rng = rng_for("crop3d", size, dtype)
    x = rng.standard_normal((2, 3, 4, 5, 6)).astype(dtype)                 # (5, 6): the last two axes
    check_forward_backward(xb, "center_crop", x, rng, size)


# ---------------------------------------------------------------------------------------------------
# The 2-D-named primitives a 3-D U-Net runs on 5-D arrays
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_5d_concat_activations_batchnorm_loss(xb, dtype):
    from unet_np.nn import BatchNorm3d, CrossEntropyLoss
    rng = rng_for("5d", dtype)
    a = rng.standard_normal((2, 3, 3, 4, 5)).astype(dtype)
    b = rng.standard_normal((2, 2, 3, 4, 5)).astype(dtype)
    y_ref, c_ref = REF["concat_forward"]([a, b], 1)
    y, c = xb.k.concat_forward([xb.put(a), xb.put(b)], 1)
    close(y, y_ref, "concat")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    for g, r in zip(xb.k.concat_backward(xb.put(dy), c), REF["concat_backward"](dy, c_ref)):
        close(g, np.ascontiguousarray(r), "concat dx")
    for op in ("relu", "sigmoid"):
        y_ref, c_ref = REF[f"{op}_forward"](a)
        y, c = getattr(xb.k, f"{op}_forward")(xb.put(a))
        close(y, y_ref, op)
        close(getattr(xb.k, f"{op}_backward")(xb.put(dy[:, :3]), c), REF[f"{op}_backward"](dy[:, :3], c_ref), op)
    for training in (True, False):
        layers = [BatchNorm3d(3, dtype=dtype), BatchNorm3d(3, dtype=dtype, backend=xb.backend)]
        layers[0].weight.data[...] = np.array([1.5, 0.5, -1.0], dtype=dtype)
        layers[0].running_mean[...] = 0.5
        layers[1].load_state_dict(layers[0].state_dict())
        for m in layers:
            m.train(training)
        outs = [m.forward(a * 3 + 1) for m in layers]
        close(outs[1], outs[0], f"BatchNorm3d (training={training})")
        grads = [m.backward(dy[:, :3]) for m in layers]
        close(grads[1], grads[0], f"BatchNorm3d dx (training={training})")
        close(layers[1].weight.grad, layers[0].weight.grad, "BatchNorm3d dgamma")
        close(layers[1].bias.grad, layers[0].bias.grad, "BatchNorm3d dbeta")
    t = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(np.int64)
    t[:, 0, :2] = -100
    pw = rng.uniform(0.5, 2, t.shape).astype(dtype)
    losses = [CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5])),
              CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), backend=xb.backend)]
    values = [losses[0].forward(a, t, pixel_weight=pw), losses[1].forward(xb.put(a), t, pixel_weight=pw)]
    assert abs(float(values[1]) - float(values[0])) <= TOL[np.dtype(dtype)] * abs(float(values[0]))
    close(losses[1].backward(), losses[0].backward(), "cross-entropy dlogits")


# ---------------------------------------------------------------------------------------------------
# Whole 3-D networks: logits, loss, input gradient, every parameter gradient, vs the numpy backend
# ---------------------------------------------------------------------------------------------------
MODEL3D_CASES = [
    ("UNet", dict(batchnorm=True)),                                         # transposed up-convolutions
    ("UNet", dict(upsample="bilinear")),                                    # trilinear + 1x1x1 conv
    ("UNet", dict(padding="valid")),                                        # centre crops of volumes
    ("UNet", dict(pad_input=True)),                                         # reflect pad3d
    ("AttentionUNet", dict(batchnorm=True)),
    ("UNetPlusPlus", dict(deep_supervision=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch,cfg", MODEL3D_CASES,
                         ids=[a + ":" + ",".join(f"{k}={v}" for k, v in c.items()) for a, c in MODEL3D_CASES])
def test_3d_networks(xb, arch, cfg, dtype):
    """A small 3-D network (depth 2, base 4, batch 2) on the backend against the numpy backend:
    logits, weighted cross-entropy (class and pixel weights, ignore_index), the input gradient and
    every parameter gradient; and no primitive ran on the host (every one is the kernels')."""
    from unet_np.nn import CrossEntropyLoss
    rng = rng_for("net3d", arch, tuple(sorted(cfg.items())), dtype)
    make = getattr(unet_np, arch)
    kw = dict(depth=2, base_channels=4, dtype=dtype, spatial_dims=3, **cfg)
    args = (1, 3) if arch == "UNet" else (1,)
    if arch != "UNet":
        kw["num_classes"] = 3
    ref = make(*args, **kw)
    model = make(*args, backend=xb.backend, **kw)
    model.load_state_dict(ref.state_dict())
    if cfg.get("padding") == "valid":
        size = ref.valid_input_shape((4, 4, 4))
    elif cfg.get("pad_input"):
        size = (6, 7, 5)
    else:
        size = (8, 8, 8)
    x = rng.standard_normal((2, 1) + tuple(size)).astype(dtype)
    for m in (ref, model):
        m.zero_grad()
    results = []
    for m in (ref, model):
        outs = m.forward(x)
        heads = outs if isinstance(outs, list) else [outs]
        out_size = tuple(heads[0].shape[2:])
        t = np.random.default_rng(7).integers(0, 3, size=(2,) + out_size).astype(np.int64)
        t[:, 0, :2] = -100
        pw = np.random.default_rng(8).uniform(0.5, 2, t.shape).astype(dtype)
        losses = [CrossEntropyLoss(weight=np.array([1.0, 2.0, 0.5]), backend=m.backend) for _ in heads]
        values = [float(fn.forward(y, t, pixel_weight=pw)) for fn, y in zip(losses, heads)]
        grads = [fn.backward(1.0 / len(heads)) for fn in losses]
        dx = m.backward(grads if isinstance(outs, list) else grads[0])
        results.append((heads, values, dx, {n: backends.to_numpy(p.grad).copy() for n, p in m.named_parameters()}))
    (h_ref, v_ref, dx_ref, g_ref), (h, v, dx, g) = results
    for i, (a, b) in enumerate(zip(h, h_ref)):
        close(a, b, f"logits of head {i}")
    for a, b in zip(v, v_ref):
        assert abs(a - b) <= TOL[np.dtype(dtype)] * abs(b), f"loss {a} vs {b}"
    close(dx, dx_ref, "dx")
    floor = 1e-2 * max(float(np.max(np.abs(a))) for a in g_ref.values())
    for n in g_ref:
        close(g[n], g_ref[n], f"grad of {n}", floor=floor)


def test_3d_unet_runs_on_kernels_only(xb):
    """A 3-D U-Net's training step launches vol.cu kernels and never calls a host fallback: every
    primitive in the backend's table that a 3-D network uses is the CudaKernels method, and its
    blocks' Conv3d -> ReLU pairs run fused."""
    backend, xp, launches = counting(xb)
    for name in cb.REPLACED:
        assert getattr(backend.ops[name], "reference", None) is None, f"{name} is a host fallback"
    model = unet_np.UNet(1, 2, depth=2, base_channels=2, dtype=np.float32, spatial_dims=3, backend=backend)
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4, 4)).astype(np.float32)
    y = model.forward(x)
    # each Conv3d -> ReLU of a block runs as conv3d_forward(activation='relu') (models/base.py
    # ConvBlock, 'conv3d_relu' in backend.fused): no ReLU kernel of its own in the forward
    assert "conv3d_relu" in backend.fused and launches["elementwise", "relu_fwd_f32"] == 0
    model.backward(xp.ones(y.shape, dtype=np.float32))
    families = collections.Counter(f for f, _ in launches)
    assert families["vol"] > 0 and xp.matmuls > 0
    for family, name in (("vol", "vol2col_f32"), ("vol", "col2vol_f32"), ("pool", "maxpool3d_fwd_f32"),
                         ("pool", "maxpool3d_bwd_f32")):
        assert launches[family, name] > 0, f"{name} did not run"
