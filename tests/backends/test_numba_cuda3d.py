"""The numba-cuda backend's volume primitives (kernels/cuda_vol.py, unet_np/backends/numba_cuda_vol.py)
against the numpy reference.

The checks live in numba_cuda_check3d.py, a script run in a SUBPROCESS under Numba's CUDA simulator
(NUMBA_ENABLE_CUDASIM=1 must be set before numba is imported), and on the real device when one is
present. Tolerances (stated in the script): relative error < 1e-4 in float32 and < 1e-10 in float64
for every 3-D primitive, for concat / batch-norm / activations / every loss on 5-D arrays, and for tiny
3-D UNets' logits, loss, dx and every parameter gradient; backward passes run twice agree bit for bit.
Under the simulator the whole script takes 50-65 s on a shared 2-core machine (the GEMMs dominate).
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
    for what in ("conv3d x(1, 3, 5, 4, 6)", "conv_transpose3d", "maxpool3d ties", "align_corners=True",
                 "upsample_nearest3d", "pad3d reflect", "center_crop", "BatchNorm3d training",
                 "softmax_dice", "input_grad=False less work", "unfused", "UNet 3-D", "float32", "float64"):
        assert what in out, f"the checks of {what!r} did not run"


def test_the_checks_can_fail():
    """A wrong kernel is caught: the script run with col2vol's bias dropped reports FAIL lines."""
    code = ("import sys; sys.argv = ['numba_cuda_check3d.py', 'kernels']\n"
            "sys.path.insert(0, %r)\n"
            "import numba_cuda_check3d as c\n"
            "from unet_np.kernels import cuda_vol\n"
            "real = cuda_vol.col2vol_kernel\n"
            "class NoBias:\n"
            "    def __getitem__(self, cfg):\n"
            "        return lambda dcols, out, g, bias, has_bias: real[cfg](dcols, out, g, bias, False)\n"
            "cuda_vol.col2vol_kernel = NoBias()\n"
            "c.CONV3D_CASES[:] = []\n"
            "c.kernel_checks(c.np.float64)\n"
            "print(len(c.failures), 'failures')\n") % str(SCRIPT.parent)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert failed and all("conv_transpose3d" in line for line in failed), r.stdout[-3000:]
    assert any("x(2, 3, 3, 2, 3)" in line and "forward" in line for line in failed)


def gpu_present():
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
