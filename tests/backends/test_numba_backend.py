"""The numba backend against the numpy reference, primitive by primitive and on a whole UNet step;
the tiled conv drivers (default numpy primitives) against the plain reference path; determinism.

Tolerances: float64 1e-10 relative (the arithmetic is the same up to summation order), float32 1e-4.
Skipped cleanly when numba is not installed.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import unet_np  # noqa: E402
from unet_np import backends  # noqa: E402
from unet_np.nn import activation, conv, conv_fast, pool  # noqa: E402
from unet_np.nn.loss import CrossEntropyLoss  # noqa: E402
from unet_np import optim  # noqa: E402
from unet_np.optim import SGD  # noqa: E402

from tests.backends.optim_cases import OPTIM_CASES, OPTIM_IDS  # noqa: E402

TOL = {np.float64: 1e-10, np.float32: 1e-4}
DTYPES = (np.float64, np.float32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


@pytest.fixture(scope="module")
def nb():
    return backends.get("numba")


def reference(name, monkeypatch=None):
    """The plain reference primitive (the tiled fast paths off)."""
    return getattr(conv, name + "_reference")


CONV_CASES = [
    # x shape, w shape, stride, padding, dilation
    ((2, 3, 7, 9), (4, 3, 3, 3), 1, 1, 1),
    ((1, 5, 6, 5), (3, 5, 3, 3), 1, 0, 1),
    ((3, 2, 9, 8), (5, 2, 3, 3), 2, 1, 1),
    ((2, 4, 8, 7), (3, 4, 3, 2), (1, 2), ((1, 2), (0, 1)), (2, 1)),
    ((2, 1, 8, 8), (6, 1, 3, 3), 1, 1, 1),        # C << O: the col2im input gradient
    ((1, 6, 5, 5), (2, 6, 5, 5), 1, 2, 1),
    ((2, 3, 6, 6), (3, 3, 1, 1), 1, 0, 1),        # 1x1
    ((2, 3, 6, 8), (3, 3, 2, 2), 2, 0, 1),        # kernel == stride
    ((3, 32, 2, 2), (24, 32, 3, 3), 1, 1, 1),     # N H W < C: col2im over 3 images per GEMM, and
                                                  # one weight-gradient GEMM over the 3 images
    ((3, 8, 7, 7), (20, 8, 3, 3), 2, 1, 1),       # stride 2: col2im, several images per GEMM
]


def _conv_all(fwd, bwd, x, w, b, args, dy):
    y, cache = fwd(x, w, b, *args)
    return (y,) + tuple(bwd(dy, cache))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("tile_bytes", [None, 64])
def test_conv2d_tiled_and_numba_match_reference(case, tile_bytes, dtype, nb, monkeypatch):
    xs, ws, s, p, d = case
    if tile_bytes is not None:                       # force bands of one row: every tiling branch
        monkeypatch.setattr(conv_fast, "TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    ref_y, _ = conv.conv2d_forward_reference(x, w, b, s, p, d)
    dy = rng.standard_normal(ref_y.shape).astype(dtype)
    ref = _conv_all(conv.conv2d_forward_reference, conv.conv2d_backward_reference, x, w, b, (s, p, d), dy)
    for fwd, bwd in ((conv.conv2d_forward, conv.conv2d_backward),
                     (nb.conv2d_forward, nb.conv2d_backward)):
        got = _conv_all(fwd, bwd, x, w, b, (s, p, d), dy)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and g.shape == r.shape
            assert rel(g, r) < TOL[dtype]
    # no bias
    got = _conv_all(nb.conv2d_forward, nb.conv2d_backward, x, w, None, (s, p, d), dy)
    assert got[3] is None and rel(got[0], ref[0] - b.reshape(1, -1, 1, 1)) < TOL[dtype]


CONVT_CASES = [
    ((2, 4, 5, 6), (4, 3, 2, 2), 2, 0, 0, 1),      # the U-Net's up-convolution
    ((3, 2, 3, 4), (2, 5, 3, 2), (3, 2), 0, 0, 1),
    ((2, 3, 4, 4), (3, 2, 3, 3), 2, 1, 1, 1),      # general: reference path
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONVT_CASES)
@pytest.mark.parametrize("tile_bytes", [None, 64])
def test_conv_transpose2d_tiled_and_numba_match_reference(case, tile_bytes, dtype, nb, monkeypatch):
    xs, ws, s, p, op, d = case
    if tile_bytes is not None:
        monkeypatch.setattr(conv_fast, "TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[1]).astype(dtype)
    args = (s, p, op, d)
    ref_y, _ = conv.conv_transpose2d_forward_reference(x, w, b, *args)
    dy = rng.standard_normal(ref_y.shape).astype(dtype)
    ref = _conv_all(conv.conv_transpose2d_forward_reference, conv.conv_transpose2d_backward_reference,
                    x, w, b, args, dy)
    for fwd, bwd in ((conv.conv_transpose2d_forward, conv.conv_transpose2d_backward),
                     (nb.conv_transpose2d_forward, nb.conv_transpose2d_backward)):
        got = _conv_all(fwd, bwd, x, w, b, args, dy)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype and g.shape == r.shape
            assert rel(g, r) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 7, 9), (3, 1, 2, 3)])
def test_maxpool2x2_numba_matches_reference(shape, dtype, nb):
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 3, size=shape).astype(dtype)          # many ties: first maximum wins
    y_ref, c_ref = pool.maxpool2d_forward(x, 2, 2, 0)
    y, c = nb.maxpool2d_forward(x, 2, 2, 0)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(c[0], c_ref[0])
    dy = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_array_equal(nb.maxpool2d_backward(dy, c), pool.maxpool2d_backward(dy, c_ref))
    # NaN propagates to the value as in the reference
    x[0, 0, 0, 0] = np.nan
    assert np.isnan(nb.maxpool2d_forward(x, 2, 2, 0)[0][0, 0, 0, 0])
    # other pools go to the reference
    y3, _ = nb.maxpool2d_forward(x[:, :, :, :], 3, 1, 1)
    np.testing.assert_array_equal(y3, pool.maxpool2d_forward(x, 3, 1, 1)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_numba_matches_reference(dtype, nb):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5, 7)).astype(dtype)
    x[0, 0, 0, :3] = (0.0, np.nan, -0.0)
    y_ref, c_ref = activation.relu_forward(x)
    y, c = nb.relu_forward(x)
    np.testing.assert_array_equal(y, y_ref)
    dy = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_array_equal(nb.relu_backward(dy, c), activation.relu_backward(dy, c_ref))
    xt = x.transpose(0, 1, 3, 2)                                # non-contiguous input
    np.testing.assert_array_equal(nb.relu_forward(xt)[0], activation.relu_forward(xt)[0])


def _step(backend, dtype, state=None, steps=1, seed=0, base_channels=4):
    """A UNet training step on backend: logits, loss, every gradient and the weights after SGD."""
    model = unet_np.UNet(1, 3, depth=2, base_channels=base_channels, dtype=dtype, backend=backend)
    if state is not None:
        model.load_state_dict(state)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 1, 16, 12)).astype(dtype)
    t = rng.integers(0, 3, size=(2, 16, 12))
    loss = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        logits = model.forward(x)
        value = loss.forward(logits, t)
        model.backward(loss.backward())
        grads = [p.grad.copy() for p in model.parameters()]
        opt.step()
    return logits, float(value), grads, model.state_dict()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base_channels", [4, 16])
def test_unet_step_numba_matches_numpy(dtype, base_channels, monkeypatch):
    """base_channels 16: every 3x3 convolution with >= 16 channels in and out (forward, weight and
    input gradients) runs as Winograd on the numba backend, im2col on the numpy one."""
    if base_channels == 16:
        monkeypatch.setattr(conv_fast, "WINO_MIN_PIXELS", 1)
    state = unet_np.UNet(1, 3, depth=2, base_channels=base_channels, dtype=dtype).state_dict()
    ref = _step("numpy", dtype, state, base_channels=base_channels)
    got = _step("numba", dtype, state, base_channels=base_channels)
    assert rel(got[0], ref[0]) < TOL[dtype]
    assert abs(got[1] - ref[1]) <= TOL[dtype] * abs(ref[1])
    for g, r in zip(got[2], ref[2]):
        assert rel(g, r) < TOL[dtype]
    for k in ref[3]:
        assert rel(got[3][k], ref[3][k]) < TOL[dtype], k


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_training_is_bit_identical_across_runs(backend):
    state = unet_np.UNet(1, 3, depth=2, base_channels=4, dtype=np.float32).state_dict()
    a = _step(backend, np.float32, state, steps=3)
    b = _step(backend, np.float32, state, steps=3)
    for k in a[3]:
        np.testing.assert_array_equal(a[3][k], b[3][k])


def test_workspace_is_never_returned():
    """Outputs of the tiled conv do not alias the per-thread workspace (a later call must not
    change an earlier result)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    y1, _ = conv.conv2d_forward(x, w, None, 1, 1, 1)
    keep = y1.copy()
    conv.conv2d_forward(x * 2, w, None, 1, 1, 1)
    np.testing.assert_array_equal(y1, keep)


WINOGRAD_CASES = [
    # x shape, w shape, padding: 3x3 stride-1 convolutions with >= 16 channels (the Winograd path)
    ((2, 16, 8, 8), (16, 16, 3, 3), 1),
    ((2, 20, 7, 9), (24, 20, 3, 3), 1),             # odd sizes: partial 4x4 output blocks
    ((1, 16, 10, 13), (16, 16, 3, 3), 1),           # blocks with 2 and 1 valid columns
    ((2, 128, 12, 12), (64, 128, 3, 3), 1),         # U-Net widths: float32 rounding of the transforms
    ((1, 16, 6, 5), (17, 16, 3, 3), 0),             # valid padding
    ((2, 32, 5, 6), (16, 32, 3, 3), ((1, 2), (0, 1))),
    ((1, 16, 1, 1), (16, 16, 3, 3), 1),             # 1x1 map
    ((1, 16, 6, 6), (80, 16, 3, 3), 1),             # C < O / 4: col2im input gradient
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("tile_bytes", [None, 64])
def test_conv2d_winograd_matches_reference(case, tile_bytes, dtype, nb, monkeypatch):
    xs, ws, p = case
    monkeypatch.setattr(conv_fast, "WINO_MIN_PIXELS", 1)  # these maps are far smaller than the threshold
    assert conv_fast.winograd_ok(nb_kernels(), ws[1], ws[0], 3, 3, (1, 1), (1, 1), *xs[:1], *xs[2:])
    if tile_bytes is not None:                       # one tile row per chunk
        monkeypatch.setattr(conv_fast, "TILE_BYTES", tile_bytes)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    ref_y, _ = conv.conv2d_forward_reference(x, w, b, 1, p, 1)
    dy = rng.standard_normal(ref_y.shape).astype(dtype)
    ref = _conv_all(conv.conv2d_forward_reference, conv.conv2d_backward_reference, x, w, b, (1, p, 1), dy)
    got = _conv_all(nb.conv2d_forward, nb.conv2d_backward, x, w, b, (1, p, 1), dy)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert rel(g, r) < TOL[dtype]
    y, cache = nb.conv2d_forward(x, w, None, 1, p, 1)
    assert rel(y, ref[0] - b.reshape(1, -1, 1, 1)) < TOL[dtype]
    dx, dw, db = nb.conv2d_backward(dy, cache, input_grad=False)
    assert dx is None and db is None and rel(dw, ref[2]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_winograd_weight_transforms_match_numpy(dtype):
    """The compiled weight transform U = G g G^T and its adjoint dg = G^T dU G against the NumPy
    versions in conv_fast.py (same float64 arithmetic, rounded once), and the adjoint identity
    <U(g), dU> = <g, dg(dU)> in float64."""
    from unet_np.kernels import cpu_winograd
    rng = np.random.default_rng(7)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    dU = rng.standard_normal((36, 5, 3)).astype(dtype)
    U = cpu_winograd.weight_transform(w, np.empty((36, 5, 3), dtype=dtype))
    dw = cpu_winograd.weight_grad_transform(dU, np.empty((5, 3, 3, 3), dtype=dtype))
    assert U.dtype == dw.dtype == dtype
    assert rel(U, conv_fast.wino_weights(w)) < TOL[dtype]
    assert rel(dw, conv_fast.wino_weight_grad(dU)) < TOL[dtype]
    if dtype == np.float64:                           # 1e-12: sums of ~540 products of size <= 1
        lhs, rhs = np.sum(U * dU), np.sum(w * dw)
        assert abs(lhs - rhs) < 1e-12 * max(abs(lhs), 1.0)
    # and G g G^T of a 3x3 kernel is its value at the 6x6 Winograd points (here for one entry)
    G = conv_fast.WINO_G
    np.testing.assert_allclose(U[:, 1, 2].reshape(6, 6), G @ w[1, 2].astype(np.float64) @ G.T,
                               rtol=TOL[dtype], atol=TOL[dtype])


def test_winograd_only_for_enough_pixels():
    """Small maps (few output pixels over the batch) take the im2col path: the weight transforms
    would cost more than the Winograd GEMMs save; so do thin layers (few channels)."""
    k = nb_kernels()
    assert conv_fast.winograd_ok(k, 64, 64, 3, 3, (1, 1), (1, 1), 1, 64, 64)      # 4096 pixels
    assert not conv_fast.winograd_ok(k, 1024, 1024, 3, 3, (1, 1), (1, 1), 1, 8, 8)
    assert conv_fast.winograd_ok(k, 1024, 1024, 3, 3, (1, 1), (1, 1), 32, 8, 8)   # 2048 pixels
    assert not conv_fast.winograd_ok(k, 256, 256, 3, 3, (1, 1), (1, 1), 1, 16, 16)
    assert not conv_fast.winograd_ok(k, 8, 64, 3, 3, (1, 1), (1, 1), 8, 64, 64)
    assert not conv_fast.winograd_ok(k, 64, 64, 3, 3, (2, 2), (1, 1), 8, 64, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_stack_splits_positions_over_threads(dtype, threads):
    """The Winograd GEMM stack (positions shared out between threads, each a single-threaded BLAS
    call) gives np.matmul's products, also for a transposed operand (the weight gradient's V^T) and
    for more threads than positions; BLAS's own thread count is restored afterwards."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from unet_np.backends.numba_backend import matmul_stack
    rng = np.random.default_rng(3)
    a = rng.standard_normal((36, 7, 5)).astype(dtype)
    b = rng.standard_normal((36, 9, 5)).astype(dtype).transpose(0, 2, 1)         # (36, 5, 9) view
    few = rng.standard_normal((2, 5, 9)).astype(dtype)
    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
        before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        buf = np.full((36, 7, 9), np.nan, dtype=dtype)
        out = matmul_stack(a, b, buf)
        out2 = matmul_stack(a[:2], few, np.full((2, 7, 9), np.nan, dtype=dtype))
        after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert before == after
    assert out is buf                                   # (the drivers rely on out being filled)
    assert out.dtype == dtype and rel(out, np.matmul(a, b)) < TOL[dtype] / 100
    assert rel(out2, np.matmul(a[:2], few)) < TOL[dtype] / 100


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_matmul_stack_works_in_a_forked_child():
    """The GEMM stack's thread pool and lock are made afresh in a forked child (the parent's pool
    threads do not exist there): a child of a process that has used the stack computes it too."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from unet_np.backends.numba_backend import matmul_stack
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((36, 6, 5)), rng.standard_normal((36, 5, 7))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        matmul_stack(a, b, np.empty((36, 6, 7)))                      # the parent's pool exists
        pid = os.fork()
        if pid == 0:                                                  # child: exit 0 only if right
            code = 1
            try:
                out = matmul_stack(a, b, np.empty((36, 6, 7)))
                code = 0 if rel(out, np.matmul(a, b)) < 1e-12 else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _omp_layer_here():
    """'omp' where Numba's OpenMP module is there (Linux), else 'workqueue' (the backend's choice)."""
    import importlib.util
    try:
        have = importlib.util.find_spec("numba.np.ufunc.omppool") is not None
    except ImportError:
        have = False
    return "omp" if have and sys.platform.startswith("linux") else "workqueue"


_OMP_LAYER = _omp_layer_here()


def _run_probe(probe, env):
    """Run ``probe`` in a fresh interpreter (Numba's threading layer is chosen once per process),
    with this environment less any threading-layer or OpenMP spin setting, plus ``env``; the last
    line it printed."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]

_FORK_AFTER_AVAILABLE = """
import os, sys
import numpy as np
from unet_np import backends
assert "numba" in backends.available()
pid = os.fork()
if pid == 0:              # the child loads and runs the numba backend: it must not be stopped
    code = 1
    try:
        y = backends.get("numba").relu_forward(np.array([-1.0, 2.0], dtype=np.float32))
        code = 0 if np.array_equal(np.asarray(y[0] if isinstance(y, tuple) else y), [0.0, 2.0]) else 1
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
print(os.WIFEXITED(status) and os.WEXITSTATUS(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_asking_which_backends_exist_starts_no_threads():
    """backends.available() lists numba without loading the backend (which starts OpenMP threads,
    after which a fork()ed child cannot run it), so a child forked after asking can use it."""
    assert _run_probe(_FORK_AFTER_AVAILABLE, {}) == "0"


_LAYER_PROBE = """
import json, os
import numpy as np
from unet_np.backends import numba_backend
import numba
numba_backend.relu_forward(np.ones(8, dtype=np.float32))          # a parallel loop: threads started
print(json.dumps([numba.threading_layer(), os.environ.get("GOMP_SPINCOUNT"), os.environ.get("KMP_BLOCKTIME")]))
"""


@pytest.mark.parametrize("env, layers, spin", [
    ({}, (_OMP_LAYER,), None),                             # omp with a short spin where it loads
    ({"NUMBA_THREADING_LAYER": "workqueue"}, ("workqueue",), None),     # the user's choice stands
    ({"GOMP_SPINCOUNT": "5"}, ("workqueue",), "5"),        # a spin we did not set: no omp, untouched
])
def test_numba_threading_layer_choice(env, layers, spin):
    """The backend starts Numba's threads on 'omp' with GOMP_SPINCOUNT / KMP_BLOCKTIME set only
    while they start (the variables are gone afterwards, so other OpenMP users never see them),
    and leaves a user's layer or spin setting alone."""
    layer, gomp, kmp = json.loads(_run_probe(_LAYER_PROBE, env))
    assert layer in layers
    assert gomp == spin and kmp is None


_TORCH_FIRST_PROBE = """
import torch
import numpy as np
from unet_np.backends import numba_backend
import numba
numba_backend.relu_forward(np.ones(8, dtype=np.float32))
print(numba.threading_layer())
"""


def test_numba_openmp_apart_from_torchs_when_torch_came_first(tmp_path):
    """PyTorch imported first puts its own OpenMP library (spinning about 10 ms after each op) in the
    global symbol scope; Numba's OpenMP module is loaded with RTLD_DEEPBIND so that its calls bind
    to the library it loads itself, started with the short spin. Checked with the dynamic linker's
    own record (LD_DEBUG=bindings): Numba's GOMP_parallel binds to a library outside torch/.
    (Without RTLD_DEEPBIND it bound to torch/lib/libgomp.so.1; CPU time used in 30 ms idle after a
    Numba loop was then 9-10 ms, against 0.1 ms with it.)"""
    torch = pytest.importorskip("torch")
    if _OMP_LAYER != "omp":
        pytest.skip("no OpenMP threading layer for Numba here")
    env = {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")}
    assert _run_probe(_TORCH_FIRST_PROBE, env) == "omp"
    lines = [line for f in tmp_path.glob("ld*") for line in f.read_text(errors="replace").splitlines()
             if "omppool" in line and "`GOMP_parallel'" in line]
    if not lines:
        pytest.skip("the dynamic linker wrote no binding record (not glibc?)")
    torch_dir = os.path.dirname(torch.__file__)
    targets = {line.split(" to ", 1)[1].split(" [")[0] for line in lines}
    assert all(not t.startswith(torch_dir) for t in targets), targets


def nb_kernels():
    from unet_np.backends.numba_backend import NUMBA_CONV_KERNELS
    return NUMBA_CONV_KERNELS


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_unet_backward_without_input_grad(backend):
    """input_grad=False returns None and leaves every parameter gradient as it was with it."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = rng.integers(0, 3, (2, 8, 8))
    model = unet_np.UNet(1, 3, depth=2, base_channels=4, dtype=np.float32, backend=backend)
    loss = CrossEntropyLoss()
    grads = []
    for input_grad in (True, False):
        model.zero_grad()
        loss.forward(model.forward(x), t)
        dx = model.backward(loss.backward(), input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append([p.grad.copy() for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
    assert model.enc1.conv[0].needs_input_grad




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,hyper", OPTIM_CASES, ids=OPTIM_IDS)
def test_fused_optimizer_updates_bit_for_bit(name, hyper, dtype, monkeypatch):
    """The numba backend's one-pass SGD / Adam (kernels/cpu_optim.py), which unet_np.optim takes for
    parameters on this backend, against the array code (the reference) on the same gradients: same
    operations in the same order, so equal to the last bit, for five steps (the first momentum step
    sets the buffer to the gradient)."""
    from unet_np import backends
    from unet_np.nn import Parameter
    nb_backend = backends.get("numba")
    assert nb_backend.sgd_step is not None and nb_backend.adam_step is not None
    rng = np.random.default_rng(3)
    shapes = [(4, 3, 3, 3), (4,), (1000,)]
    fused = [Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    plain = [Parameter(p.data.copy()) for p in fused]
    for p in fused:
        p.backend = nb_backend
    cls = getattr(optim, name)
    opts = cls(fused, **hyper), cls(plain, **hyper)
    step = "sgd_step" if name == "SGD" else "adam_step"
    real, calls = getattr(nb_backend, step), []
    monkeypatch.setattr(nb_backend, step, lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(5):
        for a, b in zip(fused, plain):
            a.grad[...] = b.grad[...] = rng.standard_normal(a.shape).astype(dtype)
        opts[0].step()
        opts[1].step()
        for a, b in zip(fused, plain):
            assert a.data.dtype == dtype
            np.testing.assert_array_equal(a.data, b.data)
    for k, v in opts[1].state_dict().items():
        np.testing.assert_array_equal(opts[0].state_dict()[k], v)
    assert len(calls) == 5 * len(shapes)            # one fused pass per parameter and step


# -- 3-D primitives: the compiled vol2col / col2vol and max-pool against the numpy backend -----------
CONV3D_CASES = [
    # x shape, w shape, stride, padding ((before, after) per axis), dilation
    ((2, 3, 5, 6, 7), (4, 3, 3, 3, 3), 1, ((1, 1),) * 3, 1),
    ((1, 2, 5, 6, 7), (3, 2, 1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1)), 1),
    ((2, 2, 7, 6, 5), (3, 2, 2, 3, 2), (2, 1, 3), ((1, 0), (2, 1), (0, 1)), (1, 2, 1)),
    ((2, 3, 4, 5, 3), (2, 3, 1, 1, 1), 1, 0, 1),
    ((1, 1, 4, 4, 4), (6, 1, 3, 3, 3), 2, ((1, 1),) * 3, 1),          # stride 2: col2vol input grad
]


@pytest.mark.parametrize("tile_bytes", [64, 48 << 20])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CONV3D_CASES)
def test_conv3d_numba_matches_numpy(case, dtype, tile_bytes, nb, monkeypatch):
    from unet_np.nn import conv3d_fast
    monkeypatch.setattr(conv3d_fast, "TILE_BYTES", tile_bytes)
    xs, ws, s, p, d = case
    rng = np.random.default_rng(21)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    ref = backends.get("numpy")
    tol = 1e-12 if dtype == np.float64 else 1e-5
    y, c = nb.conv3d_forward(x, w, b, s, p, d)
    y0, c0 = ref.conv3d_forward(x, w, b, s, p, d)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert rel(y, y0) < tol
    for a, r in zip(nb.conv3d_backward(dy, c), ref.conv3d_backward(dy, c0)):
        assert a.dtype == dtype and rel(a, r) < tol
    # the transposed convolution with the same weight read as (Cin, Cout, ...) = w's (O, C, ...)
    xt = rng.standard_normal((xs[0], ws[0]) + tuple(xs[2:])).astype(dtype)
    y, c = nb.conv_transpose3d_forward(xt, w, b[:ws[1]] if ws[1] <= ws[0] else None, s, 0, 0, d)
    y0, c0 = ref.conv_transpose3d_forward(xt, w, b[:ws[1]] if ws[1] <= ws[0] else None, s, 0, 0, d)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert rel(y, y0) < tol
    for a, r in zip(nb.conv_transpose3d_backward(dy, c), ref.conv_transpose3d_backward(dy, c0)):
        if r is not None:
            assert rel(a, r) < tol


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), ((1, 2, 2), (1, 2, 2), 0), (3, 2, 1)])
def test_maxpool3d_numba_matches_numpy(kernel, stride, padding, nb):
    rng = np.random.default_rng(22)
    x = np.round(rng.standard_normal((2, 3, 5, 7, 6)) * 2)        # ties: the first maximum wins
    x[0, 0, 0, 0, 0] = np.nan                                      # NaN propagates as in the reference
    ref = backends.get("numpy")
    y, c = nb.maxpool3d_forward(x, kernel, stride, padding)
    y0, c0 = ref.maxpool3d_forward(x, kernel, stride, padding)
    assert np.array_equal(y, y0, equal_nan=True) and np.array_equal(c[0], c0[0])
    dy = rng.standard_normal(y.shape)
    assert np.array_equal(nb.maxpool3d_backward(dy, c), ref.maxpool3d_backward(dy, c0))


# -- 3-D Winograd: F(4x4, 3x3) per plane, depth taps summed (unet_np/nn/winograd3d.py) ----------------
WINOGRAD3D_CASES = [
    # x shape, O, kernel, padding ((before, after) per axis)
    ((1, 3, 5, 6, 7), 4, (3, 3, 3), 1),                        # odd sizes: partial tiles
    ((2, 2, 4, 4, 4), 3, (3, 3, 3), 1),                        # batch 2
    ((1, 3, 6, 5, 4), 2, (3, 3, 3), 0),                        # valid padding
    ((2, 2, 3, 3, 3), 2, (3, 3, 3), ((2, 0), (1, 1), (0, 2))),  # uneven padding, planes past the edge
    ((1, 5, 2, 9, 3), 6, (3, 3, 3), 1),                        # C != O, thin depth
    ((2, 3, 4, 6, 5), 4, (1, 3, 3), (0, 1, 1)),                # nnU-Net's in-plane kernel: one tap
    ((1, 2, 5, 9, 10), 3, (2, 3, 3), ((1, 0), (2, 1), (1, 1))),  # two taps, wide in-plane padding
]


def _count_calls(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), fn(*a, **k))[1])
    return calls


@pytest.mark.parametrize("tile_bytes", [64, 48 << 20])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", WINOGRAD3D_CASES)
def test_conv3d_winograd_matches_reference(case, dtype, tile_bytes, nb, monkeypatch):
    """Forward, input and weight gradient through Winograd (forced on tiny shapes; tile_bytes 64: one
    output plane per band) against the plain vol2col reference."""
    from unet_np.nn import conv3d_fast, conv3d_reference, winograd3d
    monkeypatch.setattr(conv3d_fast, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(winograd3d, "WINO3D_MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd3d, "WINO3D_MIN_VOXELS", 1)
    fwd = _count_calls(monkeypatch, winograd3d, "winograd3d_forward")
    wgrad = _count_calls(monkeypatch, winograd3d, "winograd3d_weight_grad")
    xs, O, kernel, p = case
    rng = np.random.default_rng(23)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal((O, xs[1]) + kernel).astype(dtype)
    b = rng.standard_normal(O).astype(dtype)
    y, c = nb.conv3d_forward(x, w, b, 1, p, 1)
    y0, c0 = conv3d_reference.conv3d_forward_reference(x, w, b, 1, p, 1)
    dy = rng.standard_normal(y.shape).astype(dtype)
    assert y.dtype == dtype and rel(y, y0) < TOL[dtype]
    for a, r in zip(nb.conv3d_backward(dy, c), conv3d_reference.conv3d_backward_reference(dy, c0)):
        assert a.dtype == dtype and a.shape == r.shape and rel(a, r) < TOL[dtype]
    assert len(fwd) == 2 and len(wgrad) == 1          # forward, input gradient; weight gradient


def test_conv3d_winograd_float32_error_at_network_sizes(nb):
    """float32 Winograd against the float64 reference at the benchmark's channel counts (32 -> 16):
    MEASURED relative error of y and of the gradients. F(4x4, 3x3) multiplies by up to 8 and 5 in its
    transforms, so its float32 error is about 10x a direct convolution's (vol2col: about 2e-7), as in
    2-D (kernels/cpu_winograd.py); the bound is 5e-6, well inside the 1e-4 of every fast path."""
    from unet_np.nn import conv3d_reference, winograd3d
    rng = np.random.default_rng(24)
    x = rng.standard_normal((1, 32, 8, 8, 8))
    w = rng.standard_normal((16, 32, 3, 3, 3)) / 17
    from unet_np.backends.numba_backend import NUMBA_CONV3D_KERNELS
    assert winograd3d.winograd3d_ok(NUMBA_CONV3D_KERNELS, 32, 16, (3, 3, 3), (1, 1, 1), (1, 1, 1), 1,
                                    (8, 8, 8))                   # the defaults take this layer
    y, c = nb.conv3d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, 1, 1)
    y0, c0 = conv3d_reference.conv3d_forward_reference(x, w, None, 1, 1, 1)
    dy = rng.standard_normal(y.shape)
    errors = [rel(y, y0)]
    grads = nb.conv3d_backward(dy.astype(np.float32), c)
    errors += [rel(a, r) for a, r in zip(grads, conv3d_reference.conv3d_backward_reference(dy, c0))
               if r is not None]
    print("float32 Winograd 3-D relative errors (y, dx, dw):", errors)
    assert max(errors) < 5e-6


def test_winograd3d_only_where_it_pays():
    from unet_np.backends.numba_backend import NUMBA_CONV3D_KERNELS as k
    from unet_np.nn.conv3d_fast import NUMPY_KERNELS3D
    from unet_np.nn.winograd3d import winograd3d_ok
    one = (1, 1, 1)
    assert winograd3d_ok(k, 16, 16, (3, 3, 3), one, one, 1, (64, 64, 64))
    assert not winograd3d_ok(NUMPY_KERNELS3D, 16, 16, (3, 3, 3), one, one, 1, (64, 64, 64))
    assert not winograd3d_ok(k, 1, 16, (3, 3, 3), one, one, 1, (64, 64, 64))    # the image's conv
    assert winograd3d_ok(k, 16, 16, (1, 3, 3), one, one, 1, (64, 64, 64))       # one depth tap
    assert not winograd3d_ok(k, 16, 16, (3, 1, 1), one, one, 1, (64, 64, 64))
    assert not winograd3d_ok(k, 16, 16, (3, 5, 5), one, one, 1, (64, 64, 64))
    assert not winograd3d_ok(k, 16, 16, (3, 3, 3), (2, 2, 2), one, 1, (32, 32, 32))
    assert not winograd3d_ok(k, 16, 16, (3, 3, 3), one, (2, 2, 2), 1, (64, 64, 64))
    assert not winograd3d_ok(k, 64, 64, (3, 3, 3), one, one, 1, (4, 4, 4))
