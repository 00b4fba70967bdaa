"""The numba-cuda backend's volume primitives (kernels/cuda_vol.py, unet_np/backends/numba_cuda_vol.py)
against the numpy reference.

The checks live in numba_cuda_check3d.py, a script run in a SUBPROCESS under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1 must be set before numba is imported), and on the real device when one is
present. Tolerances (stated in the script): relative error < 1e-4 in float32 and < 1e-10 in float64
for every 3-D primitive, for concat / batch-norm / activations / every loss on 5-D arrays, and for tiny
3-D UNets' logits, loss, dx and every parameter gradient; backward passes run twice agree bit for bit.
Under the simulator the whole script takes 50-65 s on a shared 2-core machine (the GEMMs dominate).
Since the simulator runs kernels as plain Python, the volume kernels are also compiled by Numba's
nopython CPU compiler (one thread), which types them as the CUDA compiler would.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
pytest.importorskip("numba.cuda")

SCRIPT = Path(__file__).with_name("numba_cuda_check3d.py")
ROOT = Path(__file__).resolve().parents[2]


def run_checks(simulator, timeout, *sections):
    """Run the script in a fresh process; its output, after asserting it reported no failure."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), *sections], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    fails = "\n".join(line for line in out.splitlines() if line.startswith("FAIL"))
    assert proc.returncode == 0, "numba-cuda 3-D checks failed:\n" + (fails or out[-4000:])
    assert "0 failures" in out
    return out


def test_volume_primitives_under_the_simulator():
    """Every 3-D primitive, the shared primitives on 5-D arrays, conv3d_backward(input_grad=False), the
    table, and tiny 3-D UNets against the numpy backend."""
    out = run_checks(True, 400)
    assert "simulator=True" in out
    for what in ("conv3d x(1, 3, 3, 4, 5)", "conv_transpose3d", "maxpool3d ties", "align_corners=True",
                 "upsample_nearest3d", "pad3d reflect", "center_crop", "BatchNorm3d training",
                 "softmax_dice", "input_grad=False less work", "conv3d + relu fused",
                 "fused Conv3d -> ReLU steps", "UNet 3-D", "float32", "float64"):
        assert what in out, f"the checks of {what!r} did not run"


def test_the_checks_can_fail():
    """A wrong kernel is caught: with col2vol's bias dropped, the transposed convolution's forward
    check prints a FAIL line."""
    code = ("import sys\n"
            "sys.path.insert(0, %r)\n"
            "import numba_cuda_check3d as c\n"
            "from unet_np.kernels import cuda_vol\n"
            "real = cuda_vol.col2vol_kernel\n"
            "class NoBias:\n"
            "    def __getitem__(self, cfg):\n"
            "        return lambda dcols, out, g, bias, has_bias: real[cfg](dcols, out, g, bias, False)\n"
            "cuda_vol.col2vol_kernel = NoBias()\n"
            "xs, ws, s, p, op, d, bias = c.CONVT3D_CASES[0]\n"
            "x, w, b = c.rnd(*xs), c.rnd(*ws), c.rnd(ws[1])\n"
            "c.run_pair(f'conv_transpose3d x{xs}', 'conv_transpose3d_forward', 'conv_transpose3d_backward',\n"
            "           (x, w, b, s, p, op, d), c.np.float64, twice=False)\n") % str(SCRIPT.parent)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    # the forward (col2vol adds the bias) fails; the backward (no col2vol) still passes
    assert [line.split()[1:4] for line in failed] == [["conv_transpose3d", "x(2,", "3,"]], r.stdout[-3000:]
    assert "forward" in failed[0] and "ok   conv_transpose3d x(2, 3, 3, 2, 3) backward[1]" in r.stdout


def cpu_compiled_volume_kernels():
    """kernels/cuda_vol.py compiled by Numba's nopython CPU compiler: cuda.jit as njit, one thread
    (grid(1) = 0, gridsize(1) = 1). The simulator runs kernels as plain Python, so a typing error (a
    branch returning another type, say) would first show on a GPU; this compiles them without one."""
    import types

    import numba
    fake = types.SimpleNamespace(jit=lambda fn=None, **kw: numba.njit(fn) if fn else numba.njit)
    mods = {}
    for name in ("cuda_elementwise", "cuda_vol"):
        src = (ROOT / "kernels" / f"{name}.py").read_text().replace("cuda.grid(1)", "0") \
            .replace("cuda.gridsize(1)", "1").replace("from numba import cuda", "") \
            .replace("from .cuda_elementwise import", "from fake_cuda_elementwise import")
        mods[name] = types.ModuleType(f"fake_{name}")
        mods[name].cuda = fake
        sys.modules[f"fake_{name}"] = mods[name]      # for cuda_vol's import of cuda_elementwise
        exec(compile(src, f"{name}.py", "exec"), mods[name].__dict__)
    for name in mods:
        del sys.modules[f"fake_{name}"]
    return mods["cuda_vol"]


def test_volume_kernels_compile_in_nopython_mode():
    """Every kernel of cuda_vol.py type-checks and compiles (CPU nopython mode) in float32 and float64,
    and gives the reference's numbers there (relative error < 1e-5 / 1e-12)."""
    import numpy as np

    from unet_np.backends.numpy_backend import reference_ops
    from unet_np.nn.conv3d_reference import col2vol, vol2col
    vol, ref = cpu_compiled_volume_kernels(), reference_ops()
    rng = np.random.default_rng(0)

    def close(got, want, dt):
        assert np.abs(got - want.ravel()).max() <= (1e-5 if dt == np.float32 else 1e-12) * np.abs(want).max()

    for dt in (np.float32, np.float64):
        x = rng.standard_normal((2, 2, 4, 5, 4)).astype(dt)
        k, out, s, lead, d = (2, 3, 1), (3, 3, 2), (1, 2, 2), (1, 1, 0), (1, 1, 2)
        g = x.shape + k + out + s + lead + d
        cols = np.empty(2 * 6 * 2 * 18, dt)                   # (C*2*3*1, N*3*3*2)
        vol.vol2col_kernel(x.ravel(), cols, g)
        close(cols, vol2col(x, k, out, s, lead, d), dt)
        dc = rng.standard_normal(cols.size).astype(dt)
        got = np.empty(x.size, dt)
        vol.col2vol_kernel(dc, got, g, got, False)
        close(got, col2vol(dc.reshape(12, 36), x.shape, k, out, s, lead, d), dt)
        y, c = ref["maxpool3d_forward"](x, (3, 3, 2), (2, 1, 2), (1, 1, 0))
        got, arg = np.empty(y.size, dt), np.empty(y.size, np.int32)
        g = x.shape + y.shape[2:] + (3, 3, 2, 2, 1, 2, 1, 1, 0)
        vol.maxpool3d_forward_kernel(x.ravel(), got, arg, g)
        close(got, y, dt)
        dy = rng.standard_normal(y.shape).astype(dt)
        got = np.empty(x.size, dt)
        vol.maxpool3d_backward_kernel(dy.ravel(), arg, got, g)
        close(got, ref["maxpool3d_backward"](dy, c), dt)
        for kind, flags in (("trilinear", (False,)), ("trilinear", (True,)), ("nearest", ())):
            y, c = ref[f"upsample_{kind}3d_forward"](x, (2, 1, 3), *flags)
            got = np.empty(y.size, dt)
            getattr(vol, f"upsample_{kind}3d_forward_kernel")(x.ravel(), got, x.shape + (2, 1, 3), *flags)
            close(got, y, dt)
            dy = rng.standard_normal(y.shape).astype(dt)
            got = np.empty(x.size, dt)
            getattr(vol, f"upsample_{kind}3d_backward_kernel")(dy.ravel(), got, x.shape + (2, 1, 3), *flags)
            close(got, ref[f"upsample_{kind}3d_backward"](dy, c), dt)
        pads = (1, 2, 0, 3, 2, 1)
        y, c = ref["pad3d_forward"](x, pads, "reflect")
        got = np.empty(y.size, dt)
        vol.reflect_pad3d_forward_kernel(x.ravel(), got, x.shape + pads)
        close(got, y, dt)
        dy = rng.standard_normal(y.shape).astype(dt)
        got = np.empty(x.size, dt)
        vol.reflect_pad3d_backward_kernel(dy.ravel(), got, x.shape + pads)
        close(got, ref["pad3d_backward"](dy, c), dt)


def gpu_present():
    if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
        return False                                  # no NVIDIA driver device: no need to ask numba
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        r = subprocess.run([sys.executable, "-c", "from numba import cuda; print(cuda.is_available())"],
                           env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return r.stdout.strip().endswith("True")


@pytest.mark.skipif(not gpu_present(), reason="no CUDA GPU for numba")
def test_volume_primitives_on_the_gpu():
    out = run_checks(False, 600)
    assert "simulator=False" in out
