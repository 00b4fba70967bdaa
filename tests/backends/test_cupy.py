"""The cupy backend (CUDA C kernels + cuBLAS) against the numpy reference, primitive by primitive and
on whole models.

Every test runs twice, on the fixture ``xb``:
  * "cupy":     the real backend on a GPU (skipped, with the reason, without CuPy or a usable GPU);
  * "emulated": the SAME Python code of unet_np/backends/cupy_backend.py and the SAME .cu sources,
                run on the CPU: NumPy arrays, NumPy matmul for the GEMMs, and every .cu file compiled
                by g++ as plain C++ and launched with its REAL grid and thread blocks: each thread a
                coroutine, __syncthreads() a barrier, __shared__ memory per block, the threads of a
                block taking turns in a fixed order so that a missing barrier gives a wrong result
                every time (tests/backends/cuda_emulation.py). Each launch is also checked against
                the kernel's C signature (argument count, pointer dtypes, exact scalar types), which
                is what a RawKernel launch on the GPU needs. Skipped without g++.
                UNET_NP_EMULATION=0 skips it (benchmarks/gpu.sh does, to save device time).

Tolerances (relative error: max |got - want| / max |want|): float32 1e-4, float64 1e-10.
"""
import collections
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

import unet_np
from unet_np import backends
from unet_np.backends import cupy_backend as cb
from unet_np.backends.numpy_backend import reference_ops

from tests.backends import cuda_emulation as emu
from tests.backends.optim_cases import OPTIM_CASES, OPTIM_IDS

REF = reference_ops()
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------------------------------------------
# The CPU emulation of the kernels (tests/backends/cuda_emulation.py): real thread blocks
# ---------------------------------------------------------------------------------------------------
def _emu_function(family, name, defines=()):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulation of the CUDA kernels cannot be built")
    return emu.emu_function(family, name, defines)


@functools.lru_cache(maxsize=None)
def _emulated():
    return cb.backend_from("cupy-emulated", np, cb.CudaKernels(np, _emu_function))


class _Target:
    """What a test needs of the backend under test."""

    def __init__(self, kind, backend):
        self.kind, self.backend, self.k, self.xp = kind, backend, backend.kernels, backend.xp

    def put(self, a):
        return None if a is None else self.xp.asarray(a)


@pytest.fixture(scope="module", params=["cupy", "emulated"])
def xb(request):
    if request.param == "cupy":
        pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
        try:
            backend = backends.get("cupy")
        except backends.BackendUnavailable as exc:
            pytest.skip(f"the cupy backend cannot run here: {exc}")
        return _Target("cupy", backend)
    if os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("UNET_NP_EMULATION=0: the CPU emulation of the kernels is switched off")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the CPU emulation of the CUDA kernels cannot be built")
    return _Target("emulated", _emulated())


class _CountingXp:
    """An array module that counts its matmul calls (the GEMMs); everything else is the module's."""

    def __init__(self, xp):
        self._xp = xp
        self.matmuls = 0

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def matmul(self, *args, **kwargs):
        self.matmuls += 1
        return self._xp.matmul(*args, **kwargs)


def counting(xb):
    """(backend, counting array module, Counter of launches by (family, kernel)): the backend under
    test rebuilt over the same kernels, counting every GEMM and kernel launch."""
    xp = _CountingXp(xb.xp)
    launches = collections.Counter()
    get = xb.k._get

    def counted(family, name):
        fn = get(family, name)

        def launch(grid, block, args):
            launches[family, name] += 1
            return fn(grid, block, args)
        return launch

    return cb.backend_from(f"{xb.backend.name}-counting", xp, cb.CudaKernels(xp, counted)), xp, launches


# ---------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------
def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    if a.size == 0:
        return 0.0
    same_nan = np.isnan(a) == np.isnan(b)
    assert same_nan.all(), "NaN in different places"
    a, b = np.nan_to_num(a), np.nan_to_num(b)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a - b)) / scale)


def close(got, want, what, dtype=None, floor=0.0):
    """got (any backend) matches want (NumPy) within the dtype's tolerance, relative to
    max(max |want|, floor): a floor (for example a fraction of the largest gradient in a model) keeps
    an array that is zero up to rounding (the bias gradient of a convolution that batch-norm follows)
    from being judged by its noise."""
    got = backends.to_numpy(got)
    want = np.asarray(want)
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    tol = TOL[np.dtype(dtype or want.dtype)]
    err = rel_err(got, want)
    if floor and want.size:
        err = float(np.max(np.abs(got.astype(np.float64) - want))) / max(float(np.max(np.abs(want))), floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def rng_for(*key):
    """A generator seeded from the test's parameters (crc32: the same in every process)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def check_forward_backward(xb, op, x, rng, *args):
    """xb.k.<op>_forward(x, *args) and <op>_backward(dy), dy drawn from rng with the forward's shape,
    match the reference's (maxpool, upsample, crop, pad: 2-D here, 3-D in test_cupy3d.py)."""
    y_ref, c_ref = REF[f"{op}_forward"](x, *args)
    y, c = getattr(xb.k, f"{op}_forward")(xb.put(x), *args)
    close(y, y_ref, "y")
    dy = rng.standard_normal(y_ref.shape).astype(x.dtype)
    close(getattr(xb.k, f"{op}_backward")(xb.put(dy), c), np.ascontiguousarray(REF[f"{op}_backward"](dy, c_ref)),
          "dx")


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def test_table_covers_the_reference(xb):
    ops = xb.backend.ops
    assert set(ops) == set(REF), "the cupy table must have exactly the reference's primitives"
    for name in cb.REPLACED:
        assert name in REF, f"{name} is not a reference primitive"
        assert ops[name] == getattr(xb.k, name)
    # What stays the reference's: BCE and Dice (written on the input's array module, by design).
    # Listed by name: a new primitive left to the reference fails here (the 3-D ones: vol.cu).
    kept = {f"{op}_{way}" for op in ("bce_with_logits", "softmax_dice", "sigmoid_dice")
            for way in ("forward", "backward")}
    assert sorted(set(REF) - set(cb.REPLACED) - kept) == []


def test_importing_unet_np_does_not_import_cupy():
    code = "import sys, unet_np, unet_np.backends.cupy_backend; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------------
CONV_CASES = [
    # (N, C, H, W, O, (kh, kw), stride, padding, dilation, bias)
    (2, 3, 9, 8, 4, (3, 3), 1, 1, 1, True),             # the U-Net's 3x3 'same'
    (2, 3, 5, 6, 4, (1, 1), 1, 0, 1, True),             # 1x1: batched GEMM path
    (1, 2, 8, 8, 3, (2, 2), 2, 0, 1, False),            # kernel == stride
    (2, 2, 11, 10, 3, (3, 2), (2, 3), ((1, 0), (0, 2)), (2, 1), True),   # everything odd
    (3, 1, 7, 7, 2, (2, 2), 3, 0, 1, True),             # stride > kernel: gaps
    (1, 4, 6, 5, 2, (3, 3), 1, 0, 1, True),             # 'valid'
    (2, 2, 1, 1, 3, (3, 3), 1, 1, 1, True),             # 1x1 map, padded
]


def _check_conv(k, put, op, case, dtype):
    """conv2d or conv_transpose2d (``op``) of kernels ``k``, forward and backward, against the reference
    on one CONV_CASES / CONVT_CASES case. The cases differ only in their hyper-parameters: (stride,
    padding, dilation) for conv2d, (stride, padding, output_padding, dilation) for the transpose, whose
    weight is (C, O, kh, kw) instead of (O, C, kh, kw)."""
    N, C, H, W, O, (kh, kw), *hyper, bias = case
    transposed = op == "conv_transpose2d"
    rng = rng_for("convt" if transposed else "conv", case, dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((C, O, kh, kw) if transposed else (O, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    y_ref, c_ref = REF[f"{op}_forward"](x, w, b, *hyper)
    y, c = getattr(k, f"{op}_forward")(put(x), put(w), put(b), *hyper)
    close(y, y_ref, f"y {case}")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    ref = REF[f"{op}_backward"](dy, c_ref)
    got = getattr(k, f"{op}_backward")(put(dy), c)
    for name, g, r in zip(("dx", "dw", "db"), got, ref):
        if r is None:
            assert g is None
        else:
            close(g, r, f"{name} {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(xb, case, dtype):
    _check_conv(xb.k, xb.put, "conv2d", case, dtype)


DIRECT_CASES = CONV_CASES + [
    (2, 3, 9, 8, 70, (3, 3), 1, 1, 1, True),            # 2 channel tiles x 3 pixel tiles, K = 27
    (1, 9, 5, 5, 3, (1, 1), 1, 0, 1, False),            # 1x1, K = 9: c advances by 8 a step, with carry
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"k{c[5][0]}{c[5][1]}")
def test_direct_conv2d(xb, case, dtype):
    """direct='always': the forward through direct.cu's conv_implicit_gemm (no im2col, no GEMM), with
    bias, and with the ReLU fused; its plain twin conv_direct_naive; the backward (im2col path) as
    usual. Against the reference."""
    backend, xp, launches = counting(xb)
    k = backend.kernels
    k.direct, k.winograd = "always", "never"
    N, C, H, W, O, (kh, kw), stride, padding, dilation, bias = case
    suffix = cb._SUFFIX[np.dtype(dtype)]
    _check_conv(k, xb.put, "conv2d", case, dtype)
    assert launches["direct", f"conv_implicit_gemm_{suffix}"] == 1
    rng = rng_for("direct", case, dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((O, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    want = np.maximum(REF["conv2d_forward"](x, w, b, stride, padding, dilation)[0], 0)
    launches.clear()
    xp.matmuls = 0
    y, _ = k.conv2d_forward(xb.put(x), xb.put(w), xb.put(b), stride, padding, dilation, activation="relu")
    close(y, want, f"implicit GEMM + ReLU {case}")
    assert set(launches) == {("direct", f"conv_implicit_gemm_{suffix}")} and xp.matmuls == 0
    geom = tuple(np.array(k.conv2d_forward(xb.put(x), xb.put(w), None, stride, padding, dilation)[1][4]))
    y = k._direct_conv(xb.put(x), xb.put(w), xb.put(b), geom, O, relu=True, naive=True)
    close(y, want, f"naive direct + ReLU {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_without_input_grad(xb, case, dtype):
    """input_grad=False: dx is None, dw and db are those of input_grad=True, and less work is done
    (fewer GEMMs and kernel launches in all, whichever algorithm runs)."""
    N, C, H, W, O, (kh, kw), stride, padding, dilation, bias = case
    backend, xp, launches = counting(xb)
    k = backend.kernels
    rng = rng_for("conv-no-dx", case, dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((O, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    y_ref, c_ref = REF["conv2d_forward"](x, w, b, stride, padding, dilation)
    _, c = k.conv2d_forward(xb.put(x), xb.put(w), xb.put(b), stride, padding, dilation)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    counts = []
    for input_grad in (True, False):
        xp.matmuls = 0
        launches.clear()
        got = k.conv2d_backward(xb.put(dy), c, input_grad=input_grad)
        counts.append(xp.matmuls + sum(launches.values()))
        if input_grad:
            full = got
    dx, dw, db = got
    _, dw_ref, db_ref = REF["conv2d_backward"](dy, c_ref, input_grad=False)
    assert dx is None
    close(dw, dw_ref, "dw")
    np.testing.assert_array_equal(backends.to_numpy(dw), backends.to_numpy(full[1]))
    if bias:
        close(db, db_ref, "db")
    else:
        assert db is None
    (work, work_no_dx) = counts
    assert work_no_dx < work, f"GEMMs + kernel launches: {work} with dx, {work_no_dx} without"


def test_conv2d_layer_without_input_grad(xb):
    """Conv2d.needs_input_grad = False reaches the cupy primitive (conv.py passes input_grad=False)."""
    from unet_np.nn import Conv2d
    backend, xp, launches = counting(xb)
    rng = rng_for("conv-layer-no-dx")
    x = rng.standard_normal((2, 3, 6, 5))
    ref = Conv2d(3, 4, 3, padding=1, dtype=np.float64)
    layer = Conv2d(3, 4, 3, padding=1, dtype=np.float64, backend=backend)
    layer.load_state_dict(ref.state_dict())
    ref.needs_input_grad = False
    dy = rng.standard_normal(ref.forward(x).shape)
    work = []
    for needs in (True, False):
        layer.needs_input_grad = needs
        layer.zero_grad()
        layer.forward(x)
        launches.clear()
        xp.matmuls = 0
        dx = layer.backward(dy)
        assert (dx is None) == (not needs)
        work.append(xp.matmuls + sum(launches.values()))
    assert work[1] < work[0], f"GEMMs + launches: {work[0]} with dx, {work[1]} without"
    ref.forward(x)
    assert ref.backward(dy) is None
    close(layer.weight.grad, ref.weight.grad, "dw")
    close(layer.bias.grad, ref.bias.grad, "db")


CONVT_CASES = [
    # (N, Cin, H, W, Cout, (kh, kw), stride, padding, output_padding, dilation, bias)
    (2, 4, 5, 6, 3, (2, 2), 2, 0, 0, 1, True),          # the U-Net's up-convolution
    (2, 3, 5, 5, 2, (3, 3), 1, 1, 0, 1, True),
    (1, 3, 4, 5, 2, (3, 3), 2, 1, 1, 1, False),
    (2, 2, 3, 4, 3, (1, 1), 1, 0, 0, 1, True),          # 1x1 path
    (1, 2, 4, 3, 2, (3, 2), (2, 3), (1, 0), (1, 2), (2, 1), True),
    (1, 2, 3, 3, 2, (1, 1), 2, 0, 1, 1, True),          # 1x1 with stride: general path
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVT_CASES)
def test_conv_transpose2d(xb, case, dtype):
    _check_conv(xb.k, xb.put, "conv_transpose2d", case, dtype)


class _OperandXp:
    """An array module that records, for every matmul, whether both operands are C-contiguous."""

    def __init__(self, xp):
        self._xp = xp
        self.operands = []

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def matmul(self, a, b, **kwargs):
        self.operands.append((a.shape, b.shape, bool(a.flags.c_contiguous), bool(b.flags.c_contiguous)))
        return self._xp.matmul(a, b, **kwargs)


def test_weight_gradients_multiply_contiguous_columns(xb):
    """The weight gradients of conv2d and conv_transpose2d (im2col path) read the columns from a
    contiguous, transposed buffer (colsT), never through a transposed view (cols.T): their GEMM gets
    C-contiguous operands."""
    xp = _OperandXp(xb.xp)
    k = cb.CudaKernels(xp, xb.k._get, winograd="never")
    rng = rng_for("contiguous columns")
    x = xb.put(rng.standard_normal((2, 3, 6, 5)))
    for op, w, args in (("conv2d", rng.standard_normal((4, 3, 3, 3)), (1, 1, 1)),
                        ("conv_transpose2d", rng.standard_normal((3, 4, 2, 2)), (2, 0, 0, 1))):
        y, cache = getattr(k, f"{op}_forward")(x, xb.put(w), None, *args)
        xp.operands.clear()
        getattr(k, f"{op}_backward")(xb.put(rng.standard_normal(y.shape)), cache)
        dw_gemms = [o for o in xp.operands if (o[0][0], o[1][1]) == (w.shape[0], int(np.prod(w.shape[1:])))]
        assert len(dw_gemms) == 1, (op, xp.operands)
        a_shape, b_shape, a_c, b_c = dw_gemms[0]
        assert a_c and b_c, f"{op} backward: the weight gradient's GEMM {a_shape} @ {b_shape} reads a strided operand"


# ---------------------------------------------------------------------------------------------------
# Winograd F(4x4, 3x3) (winograd.cu) and the fused bias + ReLU
# ---------------------------------------------------------------------------------------------------
def _kernels(xb, **settings):
    """(CudaKernels of the backend under test with ``settings``, counting xp, Counter of launches)."""
    backend, xp, launches = counting(xb)
    k = cb.CudaKernels(xp, backend.kernels._get, **settings)
    return k, xp, launches


WINO_CASES = [
    # (N, C, H, W, O, (3, 3), stride 1, padding, dilation 1, bias)
    (2, 16, 9, 7, 16, (3, 3), 1, 1, 1, True),          # >= 16 channels: 'auto' runs Winograd; partial tiles
    (1, 3, 6, 5, 4, (3, 3), 1, 0, 1, False),           # 'valid'
    (2, 2, 5, 4, 3, (3, 3), 1, ((2, 0), (1, 2)), 1, True),   # uneven padding, up to 2
    (1, 2, 1, 1, 2, (3, 3), 1, 1, 1, True),            # a 1x1 map: one tile, mostly padding
    (1, 2, 13, 12, 3, (3, 3), 1, 3, 1, True),          # padding 3 (> 2): the input gradient's lead < 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINO_CASES)
def test_winograd_conv2d(xb, case, dtype):
    """winograd='always': forward, weight and input gradient through winograd.cu (and no im2col)."""
    k, xp, launches = _kernels(xb, winograd="always")
    _check_conv(k, xb.put, "conv2d", case, dtype)
    names = {name[:-4] for _, name in launches}
    assert {"wino_filter", "wino_input", "wino_output", "wino_output_grad", "wino_filter_grad"} <= names
    assert "im2col" not in names and "col2im" not in names


def test_winograd_auto_rule(xb):
    """'auto' takes Winograd for 3x3 stride-1 convolutions with >= 16 input and output channels only;
    'never' never does."""
    rng = rng_for("wino-rule")
    for (C, O, ksize, stride, mode), want in [((16, 16, 3, 1, "auto"), True), ((15, 32, 3, 1, "auto"), False),
                                             ((16, 16, 3, 2, "auto"), False), ((16, 16, 1, 1, "auto"), False),
                                             ((16, 16, 3, 1, "never"), False), ((1, 2, 3, 1, "always"), True)]:
        k, xp, launches = _kernels(xb, winograd=mode)
        x = xb.put(rng.standard_normal((1, C, 6, 6)))
        w = xb.put(rng.standard_normal((O, C, ksize, ksize)))
        k.conv2d_forward(x, w, None, stride, ksize // 2)
        ran = any(name.startswith("wino_input") for _, name in launches)
        assert ran == want, f"C={C} O={O} kernel {ksize} stride {stride} {mode}: Winograd {ran}"
    with pytest.raises(ValueError, match="winograd"):
        cb.CudaKernels(xb.xp, xb.k._get, winograd="sometimes")


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_error(xb, dtype):
    """Winograd's own rounding, measured on 32 -> 32 channels (each output a sum of 288 products):
    relative error against the float64 im2col reference below 1e-4 (float32) and 1e-10 (float64).
    Measured in the emulation (printed with -s): float32 y 4.4e-6, dx 3.3e-6, dw 1.7e-6, where the
    im2col path gives 5e-7, 2e-7, 5e-7 on the same data (F(4x4, 3x3)'s transforms multiply by up to
    8 and 5: about 10x the rounding); float64 about 6e-15."""
    rng = rng_for("wino-error", dtype)
    x = rng.standard_normal((1, 32, 12, 12))
    w = rng.standard_normal((32, 32, 3, 3)) / 17
    dy = rng.standard_normal((1, 32, 12, 12))
    y_ref, c_ref = REF["conv2d_forward"](x, w, None, 1, 1, 1)
    dx_ref, dw_ref, _ = REF["conv2d_backward"](dy, c_ref)
    k, _, _ = _kernels(xb, winograd="always")
    y, c = k.conv2d_forward(xb.put(x.astype(dtype)), xb.put(w.astype(dtype)), None, 1, 1, 1)
    dx, dw, _ = k.conv2d_backward(xb.put(dy.astype(dtype)), c)
    errs = {name: rel_err(backends.to_numpy(g), r) for name, g, r in (("y", y, y_ref), ("dx", dx, dx_ref),
                                                                       ("dw", dw, dw_ref))}
    print(f"Winograd F(4x4, 3x3) {np.dtype(dtype).name} relative errors: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    for name, err in errs.items():
        assert err <= TOL[np.dtype(dtype)], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path,case", [
    ("winograd", (2, 16, 6, 5, 16, (3, 3), 1, 1, 1, True)),
    ("cols", (2, 3, 6, 5, 4, (3, 3), 2, 1, 1, True)),
    ("1x1", (2, 3, 4, 5, 4, (1, 1), 1, 0, 1, False)),
])
def test_conv2d_fused_relu(xb, path, case, dtype):
    """conv2d_forward(activation='relu') = relu(conv2d + b), written in the conv's own output pass (no
    ReLU kernel launched), and its backward = the conv's backward of relu_backward(dy): for each path."""
    N, C, H, W, O, (kh, kw), stride, padding, dilation, bias = case
    k, xp, launches = _kernels(xb, winograd="auto")
    rng = rng_for("fused-relu", case, dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((O, C, kh, kw)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    z_ref, c_ref = REF["conv2d_forward"](x, w, b, stride, padding, dilation)
    y_ref, r_ref = REF["relu_forward"](z_ref)
    y, c = k.conv2d_forward(xb.put(x), xb.put(w), xb.put(b), stride, padding, dilation, activation="relu")
    assert c[0] == path
    assert not any(name.startswith("relu_fwd") for _, name in launches)
    close(y, y_ref, "relu(conv)")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    ref = REF["conv2d_backward"](REF["relu_backward"](dy, r_ref), c_ref)
    for name, g, r in zip(("dx", "dw", "db"), k.conv2d_backward(xb.put(dy), c), ref):
        if r is None:
            assert g is None
        else:
            close(g, r, name)
    with pytest.raises(ValueError, match="activation"):
        k.conv2d_forward(xb.put(x), xb.put(w), None, stride, padding, dilation, activation="tanh")


def test_allow_tf32_wraps_every_float32_gemm(xb):
    """allow_tf32 is off by default; every float32 GEMM runs inside tf32_scope(allow_tf32) (the real
    backend's switches cuBLAS to TF32 or back to float32), float64 ones never; no scope, no TF32."""
    scopes = []

    @contextlib.contextmanager
    def scope(enabled):
        scopes.append(enabled)
        yield

    rng = rng_for("tf32")
    k, xp, _ = _kernels(xb, tf32_scope=scope)
    assert k.allow_tf32 is False
    for dtype, allow in ((np.float32, False), (np.float32, True), (np.float64, True)):
        k.set_allow_tf32(allow)
        scopes.clear()
        xp.matmuls = 0
        x = xb.put(rng.standard_normal((1, 16, 6, 6)).astype(dtype))
        w = xb.put(rng.standard_normal((16, 16, 3, 3)).astype(dtype))
        y, c = k.conv2d_forward(x, w, None, 1, 1, 1)
        k.conv2d_backward(y, c)
        assert xp.matmuls > 0
        assert scopes == ([allow] * xp.matmuls if dtype == np.float32 else [])
    with pytest.raises(ValueError, match="tf32"):
        cb.CudaKernels(xb.xp, xb.k._get, allow_tf32=True)


def test_conv_kernels_64bit_index_path():
    """conv.cu runs its index arithmetic in 32-bit ints when every index fits (fast on a GPU), else in
    64-bit. The tests' small shapes always fit, so this builds conv.cu a second time with
    -DINDEX32_LIMIT=0 (always the 64-bit path) and checks the convolutions against the reference."""
    if os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("UNET_NP_EMULATION=0: the CPU emulation of the kernels is switched off")
    conv64 = functools.partial(_emu_function, defines=("INDEX32_LIMIT=0",))
    k = cb.CudaKernels(np, lambda family, name: (conv64 if family == "conv" else _emu_function)(family, name))
    for dtype in DTYPES:
        for case in CONV_CASES:
            _check_conv(k, lambda a: a, "conv2d", case, dtype)
        for case in CONVT_CASES:
            _check_conv(k, lambda a: a, "conv_transpose2d", case, dtype)


def test_conv_accepts_non_contiguous_input(xb):
    rng = rng_for("nc")
    x = rng.standard_normal((3, 2, 6, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    xt = x.transpose(1, 0, 2, 3)                          # (2, 3, 6, 7), not contiguous
    y_ref, c_ref = REF["conv2d_forward"](np.ascontiguousarray(xt), w, None, 1, 1, 1)
    y, c = xb.k.conv2d_forward(xb.put(x).transpose(1, 0, 2, 3), xb.put(w), None, 1, 1, 1)
    close(y, y_ref, "y")
    dy = rng.standard_normal(y_ref.shape)
    close(xb.k.conv2d_backward(xb.put(dy)[:, ::-1][:, ::-1], c)[0], REF["conv2d_backward"](dy, c_ref)[0], "dx")


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["relu", "sigmoid"])
def test_activation(xb, op, dtype):
    rng = rng_for("act", op, dtype)
    x = (rng.standard_normal((2, 3, 5, 7)) * 4).astype(dtype)
    x.reshape(-1)[:4] = [0.0, -0.0, 80.0, -80.0]
    y_ref, c_ref = REF[f"{op}_forward"](x)
    y, c = getattr(xb.k, f"{op}_forward")(xb.put(x))
    close(y, y_ref, "y")
    dy = rng.standard_normal(x.shape).astype(dtype)
    close(getattr(xb.k, f"{op}_backward")(xb.put(dy), c), REF[f"{op}_backward"](dy, c_ref), "dx")


# ---------------------------------------------------------------------------------------------------
# Max-pooling (values from a small set, so windows have ties: the first maximum must win)
# ---------------------------------------------------------------------------------------------------
POOL_CASES = [
    ((2, 3, 8, 8), 2, 2, 0),
    ((2, 2, 7, 9), 2, 2, 0),                              # odd: last row / column dropped
    ((1, 2, 9, 8), 3, 2, 1),                              # overlapping, padded
    ((2, 1, 6, 7), 3, 1, 1),                              # stride 1: every pixel in 9 windows
    ((1, 2, 7, 8), (2, 3), (1, 2), (1, 0)),
    ((1, 1, 5, 5), 2, 3, 0),                              # stride > kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool(xb, case, dtype):
    shape, k, s, p = case
    rng = rng_for("pool", case, dtype)
    x = rng.integers(-2, 3, size=shape).astype(dtype)     # many ties
    check_forward_backward(xb, "maxpool2d", x, rng, k, s, p)


# ---------------------------------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("shape,scale", [((2, 3, 5, 4), 2), ((1, 2, 3, 3), 3), ((1, 2, 4, 5), (2, 3)),
                                         ((2, 1, 1, 1), 2), ((1, 1, 2, 3), (1, 4))])
def test_upsample(xb, shape, scale, mode, dtype):
    rng = rng_for("up", shape, scale, mode, dtype)
    x = rng.standard_normal(shape).astype(dtype)
    check_forward_backward(xb, f"upsample_{mode}2d", x, rng, scale)


# ---------------------------------------------------------------------------------------------------
# Concatenation, crop, pad
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_concat(xb, axis, dtype):
    rng = rng_for("cat", axis, dtype)
    base = [2, 3, 4, 5]
    xs = []
    for size in (2, 1, 3):
        shape = list(base)
        shape[axis] = size
        xs.append(rng.standard_normal(shape).astype(dtype))
    y_ref, c_ref = REF["concat_forward"](xs, axis)
    y, c = xb.k.concat_forward([xb.put(x) for x in xs], axis)
    close(y, y_ref, "y")
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    got, ref = xb.k.concat_backward(xb.put(dy), c), REF["concat_backward"](dy, c_ref)
    assert isinstance(got, tuple) and len(got) == len(ref)
    for g, r in zip(got, ref):
        close(g, np.ascontiguousarray(r), "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(4, 5), (7, 8), (3, 2)])
def test_center_crop(xb, size, dtype):
    rng = rng_for("crop", size, dtype)
    x = rng.standard_normal((2, 3, 7, 8)).astype(dtype)
    check_forward_backward(xb, "center_crop", x, rng, size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,pads", [("reflect", (1, 2, 3, 0)), ("reflect", (4, 4, 5, 5)),
                                       ("reflect", (0, 0, 0, 0)), ("constant", (2, 0, 1, 3))])
def test_pad2d(xb, mode, pads, dtype):
    rng = rng_for("pad", mode, pads, dtype)
    x = rng.standard_normal((2, 2, 6, 5)).astype(dtype)
    check_forward_backward(xb, "pad2d", x, rng, pads, mode, 0.5)


def test_pad2d_bad_mode(xb):
    with pytest.raises(ValueError, match="mode"):
        xb.k.pad2d_forward(xb.put(np.zeros((1, 1, 3, 3))), (1, 1, 1, 1), "edge")


@pytest.mark.parametrize("pads", [(3, 0, 0, 0), (0, 3, 0, 0), (0, 0, 4, 0), (0, 0, 0, 5), (0, -1, 0, 0)])
def test_pad2d_reflect_pad_too_large(xb, pads):
    """A reflect pad must be smaller than the dimension it pads (one mirror image): a clear error,
    not a read outside the input. x is 4 x 3."""
    with pytest.raises(ValueError, match="smaller than the padded dimension"):
        xb.k.pad2d_forward(xb.put(np.zeros((1, 1, 4, 3))), pads, "reflect")


# ---------------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm(xb, training, affine, dtype):
    rng = rng_for("bn", training, affine, dtype)
    C = 3
    x = (rng.standard_normal((4, C, 5, 6)) * 3 + 2).astype(dtype)
    x[:, 1] = 7.0                                         # a constant channel: variance 0
    gamma = rng.standard_normal(C).astype(dtype) if affine else None
    beta = rng.standard_normal(C).astype(dtype) if affine else None
    mean = rng.standard_normal(C).astype(dtype)
    var = rng.uniform(0.5, 2, C).astype(dtype)
    y_ref, c_ref, mu_ref, v_ref = REF["batchnorm2d_forward"](x, gamma, beta, mean, var, 1e-5, training)
    y, c, mu, v = xb.k.batchnorm2d_forward(xb.put(x), xb.put(gamma), xb.put(beta), xb.put(mean), xb.put(var),
                                           1e-5, training)
    close(y, y_ref, "y")
    if training:
        close(mu, mu_ref, "batch mean")
        close(v, v_ref, "batch var")
    else:
        assert mu is None and v is None
    assert tuple(c[1].shape) == x.shape                   # BatchNorm2d.backward reads cache[1].shape
    dy = rng.standard_normal(x.shape).astype(dtype)
    got = xb.k.batchnorm2d_backward(xb.put(dy), c)
    ref = REF["batchnorm2d_backward"](dy, c_ref)
    for name, g, r in zip(("dx", "dgamma", "dbeta"), got, ref):
        close(g, r, name)


@pytest.mark.parametrize("threads", [1, 100, 256, 512])
def test_channel_reduce_any_block_size(threads):
    """norm.cu's block reduction sums every value whatever the block size (its shared buffer holds 256:
    a block of 512 once wrote past it, one of 100 summed a tree of a non-power of two)."""
    if shutil.which("g++") is None or os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("the CPU emulation is not available or switched off")
    f = emu.emu_function("norm", "channel_reduce_partial_f64")
    rng = rng_for("reduce-block", threads)
    N, C, L, splits = 2, 3, 333, 2
    a = rng.standard_normal((N, C, L))
    partial = np.zeros(C * splits)
    f((splits, C, 1), (threads, 1, 1), (a, a, a, partial, np.int64(N), np.int64(C), np.int64(L), np.int64(splits),
                                        np.int64(0)))
    assert rel_err(partial.reshape(C, splits).sum(axis=1), a.sum(axis=(0, 2))) <= 1e-12


# ---------------------------------------------------------------------------------------------------
# Softmax cross-entropy
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("class_weight", [False, True])
@pytest.mark.parametrize("pixel_weight", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (4, 5), (2, 1, 3, 3)])
def test_softmax_cross_entropy(xb, shape, class_weight, pixel_weight, dtype):
    rng = rng_for("ce", shape, class_weight, pixel_weight, dtype)
    N, C = shape[:2]
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    x.reshape(-1)[0] = 60.0                               # large logits must not overflow
    t = rng.integers(0, C, size=(N,) + shape[2:]).astype(np.int64)
    t.reshape(-1)[1::4] = -100                            # ignored pixels
    cw = rng.uniform(0.2, 3, C).astype(dtype) if class_weight else None
    pw = rng.uniform(0.5, 10, t.shape).astype(dtype) if pixel_weight else None
    l_ref, c_ref = REF["softmax_cross_entropy_forward"](x, t, cw, -100, pw)
    loss, c = xb.k.softmax_cross_entropy_forward(xb.put(x), xb.put(t), xb.put(cw), -100, xb.put(pw))
    assert tuple(loss.shape) == () and loss.dtype == np.dtype(dtype)
    close(loss, l_ref, "loss")
    close(xb.k.softmax_cross_entropy_backward(c), REF["softmax_cross_entropy_backward"](c_ref), "dlogits")


def test_softmax_cross_entropy_all_ignored(xb):
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2))
    t = np.full((1, 2, 2), 7, dtype=np.int64)
    loss, c = xb.k.softmax_cross_entropy_forward(xb.put(x), xb.put(t), None, 7, None)
    assert np.isnan(float(loss))
    assert not np.any(backends.to_numpy(xb.k.softmax_cross_entropy_backward(c)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_other_losses_run_on_the_backend(xb, dtype):
    """BCE and Dice keep the reference primitives, written on the input's array module."""
    rng = rng_for("other", dtype)
    x = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    tf = rng.uniform(0, 1, x.shape).astype(dtype)
    ops = xb.backend.ops
    l_ref, c_ref = REF["bce_with_logits_forward"](x, tf, None)
    loss, c = ops["bce_with_logits_forward"](xb.put(x), xb.put(tf), None)
    close(loss, l_ref, "bce")
    close(ops["bce_with_logits_backward"](c), REF["bce_with_logits_backward"](c_ref), "dbce")
    l_ref, c_ref = REF["sigmoid_dice_forward"](x, tf, 1.0, 1e-7)
    loss, c = ops["sigmoid_dice_forward"](xb.put(x), xb.put(tf), 1.0, 1e-7)
    close(loss, l_ref, "dice")
    close(ops["sigmoid_dice_backward"](c), REF["sigmoid_dice_backward"](c_ref), "ddice")
    t = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int64)
    t[0, 0] = -100
    l_ref, c_ref = REF["softmax_dice_forward"](x, t, 1.0, 1e-7, -100, False)
    loss, c = ops["softmax_dice_forward"](xb.put(x), xb.put(t), 1.0, 1e-7, -100, False)
    close(loss, l_ref, "softmax dice")
    close(ops["softmax_dice_backward"](c), REF["softmax_dice_backward"](c_ref), "dsoftmax dice")


# ---------------------------------------------------------------------------------------------------
# Fused optimizer kernels against unet_np.optim (three steps)
# ---------------------------------------------------------------------------------------------------
def _param_pair(xb, dtype, seed):
    from unet_np.nn import Parameter
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((3, 4, 5)).astype(dtype)
    p_ref = Parameter(data.copy())
    p = Parameter(xb.put(data.copy()))
    return rng, p_ref, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2),
                                dict(momentum=0.9, nesterov=True), dict(momentum=0.99, dampening=0.1)])
def test_fused_sgd(xb, hp, dtype):
    from unet_np.optim import SGD
    rng, p_ref, p = _param_pair(xb, dtype, 1)
    opt = SGD([p_ref], lr=0.05, **hp)
    buf = xb.xp.zeros(p.data.shape, dtype=dtype)
    for step in range(3):
        g = rng.standard_normal(p.data.shape).astype(dtype)
        p_ref.grad[...] = g
        opt.step()
        xb.k.sgd_step(p.data, xb.put(g), buf, 0.05, first=(step == 0), **hp)
        close(p.data, p_ref.data, f"p after step {step + 1}")
        if hp["momentum"]:
            close(buf, opt.state[0]["momentum_buffer"], "momentum buffer")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["adam", "adam_wd", "adamw", "amsgrad", "beta1_small"])
def test_fused_adam(xb, kind, dtype):
    from unet_np.optim import Adam, AdamW
    rng, p_ref, p = _param_pair(xb, dtype, 2)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    cls, decoupled, amsgrad = Adam, False, False
    if kind == "adam_wd":
        hp["weight_decay"] = 0.1
    elif kind == "adamw":
        cls, decoupled, hp["weight_decay"] = AdamW, True, 0.05
    elif kind == "amsgrad":
        amsgrad = True
    elif kind == "beta1_small":
        hp["betas"] = (0.3, 0.9)                          # torch's other lerp branch (1 - beta1 >= 0.5)
    opt = cls([p_ref], amsgrad=amsgrad, **hp)
    m = xb.xp.zeros(p.data.shape, dtype=dtype)
    v = xb.xp.zeros(p.data.shape, dtype=dtype)
    vmax = xb.xp.zeros(p.data.shape, dtype=dtype) if amsgrad else None
    for step in range(1, 4):
        g = rng.standard_normal(p.data.shape).astype(dtype) * (0.1 if step == 2 else 1.0)
        p_ref.grad[...] = g
        opt.step()
        xb.k.adam_step(p.data, xb.put(g), m, v, step, hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"],
                       decoupled=decoupled, vmax=vmax)
        close(p.data, p_ref.data, f"p after step {step}")
        close(m, opt.state[0]["exp_avg"], "exp_avg")
        close(v, opt.state[0]["exp_avg_sq"], "exp_avg_sq")




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,hp", OPTIM_CASES, ids=OPTIM_IDS)
def test_optimizer_steps_are_fused(xb, name, hp, dtype):
    """unet_np.optim on parameters of this backend runs optim.cu once per parameter and step (nothing
    else), and matches the same optimizer's array code on NumPy parameters, step by step: parameters
    and every state buffer (the momentum buffer from the first step on, where PyTorch copies g)."""
    from unet_np import optim
    from unet_np.nn import Parameter
    backend, _, launches = counting(xb)
    rng = rng_for("optim", name, tuple(sorted(hp.items())), dtype)
    shapes = [(3, 2, 3, 3), (3,), (2, 5)]
    init = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    ref = [Parameter(a.copy()) for a in init]                 # no backend: the array code
    fused = [Parameter(xb.put(a.copy())) for a in init]
    for p in fused:
        p.backend = backend                                    # as a module of this backend sets it
    opt_ref = getattr(optim, name)(ref, **hp)
    opt = getattr(optim, name)(fused, **hp)
    kernel = f"{'sgd' if name == 'SGD' else 'adam'}_step_{cb._SUFFIX[np.dtype(dtype)]}"
    for step in range(1, 5):
        for pr, pf in zip(ref, fused):
            g = rng.standard_normal(pr.shape).astype(dtype) * (0.1 if step == 2 else 1.0)
            pr.grad[...] = g
            pf.grad[...] = xb.put(g)
        opt_ref.step()
        opt.step()
        assert dict(launches) == {("optim", kernel): step * len(shapes)}
        for i, (pr, pf) in enumerate(zip(ref, fused)):
            close(pf.data, pr.data, f"step {step}: parameter {i}")
            assert sorted(opt.state[i]) == sorted(opt_ref.state[i])
            for buf, value in opt_ref.state[i].items():
                close(opt.state[i][buf], value, f"step {step}: parameter {i} {buf}")


def test_parameters_carry_their_backend(xb):
    """A module's parameters know the backend they live on (and follow .to()): the optimizers use its
    fused updates there, and the array code elsewhere."""
    from unet_np.nn import Conv2d
    from unet_np.optim import _fused
    layer = Conv2d(2, 3, 3, dtype=np.float64, backend=xb.backend)
    assert layer.weight.backend is xb.backend and layer.bias.backend is xb.backend
    assert _fused(layer.weight, "sgd_step") == xb.k.sgd_step
    layer.to("numpy")
    assert layer.weight.backend is backends.get("numpy")
    assert _fused(layer.weight, "sgd_step") is None and _fused(layer.bias, "adam_step") is None
    layer.to(xb.backend)
    assert _fused(layer.bias, "adam_step") == xb.k.adam_step


# ---------------------------------------------------------------------------------------------------
# The hand-written GEMM (block-cooperative: shared-memory tiles and barriers; real blocks in emulation)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mnk", [(64, 64, 64), (37, 70, 19), (1, 130, 5), (129, 1, 200)])
def test_gemm_tiled(xb, mnk, version, dtype):
    M, N, K = mnk
    if xb.kind == "emulated" and M * N * K > 64 ** 3 // 2:
        M, N, K = 33, 40, 48                  # the emulation runs thread by thread: a smaller odd shape
    rng = rng_for("gemm", mnk, dtype)
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    c = xb.k.gemm_tiled(xb.put(a), xb.put(b), version=version)
    want = a.astype(np.float64) @ b.astype(np.float64)
    err = rel_err(backends.to_numpy(c), want)
    assert err <= (1e-5 if dtype == np.float32 else 1e-12), f"relative error {err:.2e}"


@pytest.mark.parametrize("version", [1, 2])
def test_gemm_tiled_threads_in_reverse_order(version):
    """The same tiled GEMM with the threads of each block taking turns last to first (the emulation's
    other schedule): a kernel correct under both has no barrier missing in either direction."""
    if shutil.which("g++") is None or os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("the CPU emulation is not available or switched off")
    k = emu.emulated_kernels(order="reverse")
    rng = rng_for("gemm-reverse", version)
    a, b = rng.standard_normal((21, 35)), rng.standard_normal((35, 18))
    assert rel_err(k.gemm_tiled(a, b, version=version), a @ b) <= 1e-12


RACY_SOURCE = r"""
// A block-cooperative kernel with its barrier behind a macro: out[i] = in[i] + in[(i + 1) % n] of a
// tile staged in shared memory (every thread reads a value another thread wrote).
extern "C" __global__ void neighbour_sum_f64(const double* in, double* out, long long n) {
    __shared__ double tile[64];
    const int t = threadIdx.x;
    tile[t] = in[t];
    BARRIER;
    if (t < n) out[t] = tile[t] + tile[(t + 1) % n];
}
"""


@pytest.mark.parametrize("barrier", ["__syncthreads()", "(void)0"])
def test_emulation_catches_a_missing_barrier(barrier):
    """The emulation is strict enough to fail a kernel whose barrier is missing (every time, not once
    in a while), and passes the same kernel with it."""
    if shutil.which("g++") is None or os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("the CPU emulation is not available or switched off")
    f = emu.emu_function("racy", "neighbour_sum_f64", defines=(f"BARRIER={barrier}",), source=RACY_SOURCE)
    x = np.arange(1.0, 65.0)
    out = np.zeros(64)
    f((1,), (64,), (x, out, np.int64(64)))
    ok = np.array_equal(out, x + np.roll(x, -1))
    assert ok == (barrier == "__syncthreads()")


def test_emulation_rejects_a_barrier_in_divergent_code():
    if shutil.which("g++") is None or os.environ.get("UNET_NP_EMULATION", "1") == "0":
        pytest.skip("the CPU emulation is not available or switched off")
    src = r"""
extern "C" __global__ void early_exit_f64(double* out, long long n) {
    if ((long long)threadIdx.x >= n) return;        // wrong: the others then wait at the barrier
    out[threadIdx.x] = 1.0;
    __syncthreads();
}
"""
    f = emu.emu_function("divergent", "early_exit_f64", source=src)
    with pytest.raises(AssertionError, match="divergent"):
        f((1,), (32,), (np.zeros(32), np.int64(8)))


# ---------------------------------------------------------------------------------------------------
# Whole models: forward, loss, every gradient, one SGD step and one Adam step, vs the numpy backend
# ---------------------------------------------------------------------------------------------------
MODEL_CASES = [
    dict(),
    dict(winograd="always"),          # every 3x3 convolution through winograd.cu, forward and backward
    dict(batchnorm=True),
    dict(upsample="bilinear"),
    dict(padding="valid"),
    dict(pad_input=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", MODEL_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_unet_training_steps(xb, cfg, dtype):
    from unet_np.nn import CrossEntropyLoss
    from unet_np.optim import SGD, Adam
    rng = rng_for("unet", tuple(sorted(cfg.items())), dtype)
    cfg = dict(cfg)
    backend = xb.backend
    if "winograd" in cfg:
        backend = cb.backend_from(xb.backend.name, xb.xp,
                                  cb.CudaKernels(xb.xp, xb.k._get, winograd=cfg.pop("winograd")))
    kw = dict(depth=2, base_channels=4, dtype=dtype, **cfg)
    ref = unet_np.UNet(1, 3, **kw)
    model = unet_np.UNet(1, 3, backend=backend, **kw)
    model.load_state_dict(ref.state_dict())
    if cfg.get("padding") == "valid":
        hw = ref.valid_input_shape((44, 44))
    elif cfg.get("pad_input"):
        hw = (14, 11)
    else:
        hw = (16, 12)
    out_hw = ref.output_shape(hw)
    weight = np.array([1.0, 2.0, 0.5])
    losses = (CrossEntropyLoss(weight=weight), CrossEntropyLoss(weight=weight, backend=backend))
    # Adam divides by sqrt(v) + eps, so a gradient that is zero up to rounding (a convolution's bias
    # before batch-norm, see the floor below) moves its parameter by up to lr with a random sign: a
    # larger eps than the default 1e-8 bounds that amplification of rounding noise (the fused Adam
    # test above checks the default eps on well-conditioned gradients).
    adam_eps = 1e-5
    opts = None
    for step, name in enumerate(("SGD", "Adam")):
        x = rng.standard_normal((2, 1) + tuple(hw)).astype(dtype)
        t = rng.integers(0, 3, size=(2,) + tuple(out_hw)).astype(np.int64)
        t[:, 0, :3] = -100
        pw = rng.uniform(0.5, 3, t.shape).astype(dtype)
        y_ref = ref.forward(x)
        y = model.forward(x)                              # NumPy input is accepted
        close(y, y_ref, f"{name}: logits")
        l_ref = losses[0].forward(y_ref, t, pixel_weight=pw)
        loss = losses[1].forward(y, t, pixel_weight=pw)
        assert abs(loss - l_ref) <= TOL[np.dtype(dtype)] * abs(l_ref), f"{name}: loss {loss} vs {l_ref}"
        ref.zero_grad()
        model.zero_grad()
        dx_ref = ref.backward(losses[0].backward())
        dx = model.backward(losses[1].backward())
        close(dx, dx_ref, f"{name}: dx")
        # Judged against at least 1% of the largest gradient: with batch-norm, a convolution's bias
        # gradient is zero up to rounding (the normalisation removes any constant shift), and the
        # float32 reference's own rounding is then all there is to compare.
        floor = 1e-2 * max(float(np.max(np.abs(p.grad))) for p in ref.parameters())
        for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
            close(p.grad, p_ref.grad, f"{name}: grad of {n}", floor=floor)
        if step == 0:
            opts = (SGD(ref.parameters(), lr=0.05, momentum=0.9), SGD(model.parameters(), lr=0.05, momentum=0.9))
        else:
            opts = (Adam(ref.parameters(), lr=1e-3, eps=adam_eps), Adam(model.parameters(), lr=1e-3, eps=adam_eps))
        opts[0].step()
        opts[1].step()
        for (n, p_ref), (_, p) in zip(ref.named_parameters(), model.named_parameters()):
            close(p.data, p_ref.data, f"after one {name} step: {n}")
    if cfg.get("batchnorm"):
        sd_ref, sd = ref.state_dict(), model.state_dict()
        for n in sd_ref:
            if "running" in n:
                close(sd[n], sd_ref[n], n)
        ref.eval()
        model.eval()
        x = rng.standard_normal((2, 1) + tuple(hw)).astype(dtype)
        close(model.forward(x), ref.forward(x), "eval-mode logits")


ARCH_CASES = [  # model, its arguments, loss, optimizer
    ("AttentionUNet", dict(num_classes=3), "softmax Dice", "Adam"),
    ("AttentionUNet", dict(num_classes=2, batchnorm=True, upsample="bilinear"), "sigmoid Dice", "SGD"),
    ("UNetPlusPlus", dict(num_classes=3, deep_supervision=True), "cross-entropy", "AdamW"),
    ("UNetPlusPlus", dict(num_classes=1), "BCE", "SGD"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch,kw,loss_name,opt_name", ARCH_CASES, ids=[f"{a}-{l}" for a, _, l, _ in ARCH_CASES])
def test_other_architectures_and_losses(xb, arch, kw, loss_name, opt_name, dtype):
    """Attention U-Net and U-Net++ with every loss: logits, loss, every gradient (the backward without
    the input gradient, as a training step runs it) and one optimizer step, fused (one optim.cu launch
    per parameter), against the numpy backend."""
    from unet_np import optim
    from unet_np.nn import BCEWithLogitsLoss, CrossEntropyLoss, DiceLoss
    backend, _, launches = counting(xb)
    rng = rng_for("arch", arch, tuple(sorted(kw.items())), loss_name, dtype)
    make = getattr(unet_np, arch)
    ref = make(1, depth=2, base_channels=4, dtype=dtype, **kw)
    model = make(1, depth=2, base_channels=4, dtype=dtype, backend=backend, **kw)
    model.load_state_dict(ref.state_dict())
    C = kw["num_classes"]
    x = rng.standard_normal((2, 1, 12, 8)).astype(dtype)
    if loss_name in ("BCE", "sigmoid Dice"):
        t = rng.uniform(0, 1, (2, C, 12, 8)).astype(dtype)
    else:
        t = rng.integers(0, C, size=(2, 12, 8)).astype(np.int64)
        t[:, :2, :3] = -100
    make_loss = {"softmax Dice": lambda b: DiceLoss(backend=b),
                 "sigmoid Dice": lambda b: DiceLoss(mode="sigmoid", backend=b),
                 "cross-entropy": lambda b: CrossEntropyLoss(weight=np.arange(1.0, C + 1), backend=b),
                 "BCE": lambda b: BCEWithLogitsLoss(pos_weight=np.full((C, 1, 1), 2.0), backend=b)}[loss_name]
    hp = dict(lr=0.05, momentum=0.9) if opt_name == "SGD" else dict(lr=1e-3, eps=1e-5)
    results = []
    for m in (ref, model):
        outs = m.forward(x)
        heads = outs if isinstance(outs, list) else [outs]
        losses = [make_loss(m.backend) for _ in heads]
        values = [fn.forward(y, t) for fn, y in zip(losses, heads)]
        grads = [fn.backward(1.0 / len(heads)) for fn in losses]
        m.zero_grad()
        assert m.backward(grads if isinstance(outs, list) else grads[0], input_grad=False) is None
        g = {n: backends.to_numpy(p.grad).copy() for n, p in m.named_parameters()}
        launches.clear()
        getattr(optim, opt_name)(m.parameters(), **hp).step()
        results.append((heads, values, g, m.state_dict(), dict(launches)))
    (h_ref, v_ref, g_ref, s_ref, _), (h, v, g, s, steps) = results
    for i, (a, b) in enumerate(zip(h, h_ref)):
        close(a, b, f"logits of head {i}")
    for a, b in zip(v, v_ref):
        assert abs(a - b) <= TOL[np.dtype(dtype)] * abs(b), f"loss {a} vs {b}"
    floor = 1e-2 * max(float(np.max(np.abs(a))) for a in g_ref.values())
    for n in g_ref:
        close(g[n], g_ref[n], f"grad of {n}", floor=floor)
    kernel = f"{'sgd' if opt_name == 'SGD' else 'adam'}_step_{cb._SUFFIX[np.dtype(dtype)]}"
    assert steps == {("optim", kernel): len(model.parameters())}
    for n in s_ref:
        if s_ref[n].dtype.kind == "f":
            close(s[n], s_ref[n], f"after one {opt_name} step: {n}")
        else:                                                  # num_batches_tracked
            np.testing.assert_array_equal(s[n], s_ref[n])


def test_model_to_backend_and_back(xb):
    ref = unet_np.UNet(1, 2, depth=2, base_channels=4, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 8))
    want = ref.forward(x)
    m = unet_np.UNet(1, 2, depth=2, base_channels=4, dtype=np.float64)
    m.load_state_dict(ref.state_dict())
    m.to(xb.backend)
    close(m.forward(x), want, "after .to(backend)")
    m.to("numpy")
    close(m.forward(x), want, "after .to('numpy')")


# ---------------------------------------------------------------------------------------------------
# The U-Net block's Conv2d -> ReLU pairs, fused (models/base.py ConvBlock, backend.fused)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("winograd", ["always", "never"])
def test_unet_blocks_fuse_conv_relu(xb, winograd, dtype):
    """On this backend each Conv2d -> ReLU of a U-Net block runs as conv2d_forward(activation='relu'):
    no ReLU kernel of its own in the forward. Logits, loss, input gradient, every parameter gradient
    and one SGD step equal the numpy backend's and the same backend's unfused run (fused set
    emptied); parameter names, order and state_dict are unchanged. winograd: 'always' puts every 3x3
    convolution through winograd.cu, 'never' through im2col."""
    from unet_np.nn import CrossEntropyLoss
    from unet_np.optim import SGD
    launches = collections.Counter()
    get = xb.k._get

    def counted(family, name):
        fn = get(family, name)

        def launch(grid, block, args):
            launches[family, name] += 1
            return fn(grid, block, args)
        return launch

    k = cb.CudaKernels(xb.xp, counted, winograd=winograd)
    fused = cb.backend_from(f"{xb.backend.name}-fused", xb.xp, k)
    plain = cb.backend_from(f"{xb.backend.name}-unfused", xb.xp, k)
    plain.fused = frozenset()
    assert "conv2d_relu" in fused.fused
    rng = rng_for("fused block", winograd, dtype)
    kw = dict(depth=2, base_channels=4, dtype=dtype)
    ref = unet_np.UNet(1, 3, **kw)
    models = (ref, unet_np.UNet(1, 3, backend=fused, **kw), unet_np.UNet(1, 3, backend=plain, **kw))
    for m in models[1:]:
        m.load_state_dict(ref.state_dict())
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
        assert list(m.state_dict()) == list(ref.state_dict())
    x = rng.standard_normal((2, 1, 16, 12)).astype(dtype)
    t = rng.integers(0, 3, size=(2, 16, 12)).astype(np.int64)
    relu_fwd = ("elementwise", f"relu_fwd_{cb._SUFFIX[np.dtype(dtype)]}")
    relu_bwd = ("elementwise", f"relu_bwd_{cb._SUFFIX[np.dtype(dtype)]}")
    results = []
    for m in models:
        loss_fn = CrossEntropyLoss(backend=m.backend)
        launches.clear()
        y = m.forward(x)
        relus = launches[relu_fwd]
        loss = loss_fn.forward(y, t)
        m.zero_grad()
        launches.clear()
        dx = m.backward(loss_fn.backward())
        relus = (relus, launches[relu_bwd])
        grads = {n: backends.to_numpy(p.grad).copy() for n, p in m.named_parameters()}
        SGD(m.parameters(), lr=0.05, momentum=0.9).step()
        results.append((y, loss, dx, grads, m.state_dict(), relus))
    blocks = 5                                   # enc1, enc2, bottleneck, dec2, dec1: two ReLUs each
    assert results[1][5][0] == 0, "the fused model launched ReLU kernels of its own"
    assert results[2][5] == (2 * blocks, 2 * blocks), "the unfused model runs one ReLU kernel per ReLU layer"
    # On the Winograd path the mask is applied inside the transforms that read dy: no relu_bwd pass
    assert results[1][5][1] == (0 if winograd == "always" else 2 * blocks)
    (y_r, l_r, dx_r, g_r, s_r, _) = results[0]
    for what, (y, loss, dx, g, s, _) in (("fused", results[1]), ("unfused", results[2]),
                                          ("fused vs unfused", results[2])):
        if what == "fused vs unfused":           # the two runs of this backend against each other
            y_r, l_r, dx_r, g_r, s_r = (backends.to_numpy(results[1][0]), float(results[1][1]),
                                        backends.to_numpy(results[1][2]), results[1][3], results[1][4])
        close(y, y_r, f"{what}: logits")
        assert abs(float(loss) - float(l_r)) <= TOL[np.dtype(dtype)] * abs(float(l_r)), what
        close(dx, dx_r, f"{what}: dx")
        for n in g_r:
            close(g[n], g_r[n], f"{what}: grad of {n}")
        for n in s_r:
            close(s[n], s_r[n], f"{what}: after one SGD step: {n}")
